"""The Triton kernels, from the repository's kernels/ folder (one file per op); kernels/ itself has no __init__.py, so
the folder is never a regular top-level `kernels` package that would shadow PyPI's (transformers and bitsandbytes import
that one)."""
