"""Shared by the Python twins of the benchmarks (kernels/bench_bias_gelu.py,
modules/m02_data/bench_train.py, modules/m03_transformer/bench_minilm.py)."""
import ctypes


def retain_freed_memory():
    """glibc mallopt: no mmap, no trim; what course::runtime::retain_freed_memory does."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
