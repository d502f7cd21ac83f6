"""The label conventions lf.data writes and lf.kernels' losses read (a leaf module: both import it)."""

IGNORE_INDEX = -100  # the label of a token that carries no loss (prompts, padding): transformers' convention
