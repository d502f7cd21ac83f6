"""CPU benchmark of lf's kernels against the Hugging Face code they replace.

Times RMSNorm, RoPE, SwiGLU and GeGLU (forward, backward, both) at Llama-3-8B widths against HF's eager code
and ``torch.compile`` of it, in one process per glibc allocator setting, and relates lf's achieved bytes/s to
a copy bandwidth measured in the same run. Run from the repository root: ``python -m bench --help``;
see bench/README.md.
"""
