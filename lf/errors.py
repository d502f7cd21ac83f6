"""The exception families lf raises at its users: each message says what is wrong, where, and what to do."""


class KernelError(ValueError):
    """lf's kernels refuse something: LF_KERNEL_BACKEND names a backend that is unknown or cannot run here,
    lf.kernels.patch is given a kind it does not have, a drop-in module a config it cannot build, or (the
    subclasses below) a kernel call's arguments. One `except KernelError` catches them all."""


class KernelInputError(KernelError):
    """A kernel was called with arguments it cannot take (shape, device, layout)."""


class KernelDTypeError(KernelInputError, TypeError):
    """A kernel was called with a tensor of a dtype it does not support or that does not match."""


class DataError(ValueError):
    """A dataset, a dataset_info.json entry, a template or a data option cannot be used as given."""


class ConfigError(ValueError):
    """A training config (file, key=value overrides) has a key, a value or a combination lf cannot run."""


class ModelError(ValueError):
    """A model, tokenizer, adapter or model option cannot be loaded or applied as given."""



class RequestError(ValueError):
    """A request the serving engine cannot serve (unknown or out-of-range settings, a prompt too long for the
    model's context); the message says which and why."""


class TrainError(RuntimeError):
    """A training run cannot go on (its output_dir holds another run, the loss stopped being a number, ...)."""

def did_you_mean(name: str, choices) -> str:
    """' Did you mean: a, b?' naming the registered names closest to `name`, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(str(name), sorted(choices), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
