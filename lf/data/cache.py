"""Keys for what `datasets` caches of lf's data work (converted and tokenized datasets, packed rows).

`datasets` keys a map's result by pickling its function, and pickles a module's functions by name: after an
upgrade of lf, a cache written by the old code would be read back as if nothing had changed. `SOURCE` (a hash of
lf's data code) goes into every key, with the options that shape the result and the worker count (datasets reuses
cached shards from a run with another worker count, which for packing would mean other rows).
"""

import hashlib
from pathlib import Path


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


SOURCE = _source_hash()


def fingerprint(dataset, *parts) -> str:
    """The cache key of a map over `dataset` that depends on `parts` (functions, options; hashed by content)."""
    from datasets.fingerprint import Hasher

    return Hasher.hash([getattr(dataset, "_fingerprint", None), SOURCE, list(parts)])
