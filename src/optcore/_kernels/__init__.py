"""Compiled kernels. Only the modules in this package contain loops over elements."""
