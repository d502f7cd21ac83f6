"""Triton kernels of lf, one file per op; installed as lf._triton."""
