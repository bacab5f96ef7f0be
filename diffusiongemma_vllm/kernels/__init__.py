"""Triton kernels and their pure-torch references; every module imports without a GPU."""
