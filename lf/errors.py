"""The exception families lf raises at its users: each message says what is wrong, where, and what to do."""


class KernelInputError(ValueError):
    """A kernel was called with arguments it cannot take (shape, device, layout)."""


class KernelDTypeError(KernelInputError, TypeError):
    """A kernel was called with a tensor of a dtype it does not support or that does not match."""
