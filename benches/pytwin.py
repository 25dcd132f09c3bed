"""Shared by the Python twins of the benchmarks in benches/ (bias_gelu.py, cross_entropy.py,
m02_train.py, m03_minilm.py, m04_gpt.py, m05_allreduce.py)."""
import argparse
import ctypes


def retain_freed_memory():
    """glibc mallopt: no mmap, no trim; what course::runtime::retain_freed_memory does."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def setup(extra=None):
    """The flags every twin takes (--threads N, --retain-freed-memory, plus what `extra(parser)`
    adds), applied: mallopt first, then torch's thread count. Returns the parsed arguments."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--retain-freed-memory", action="store_true", help="glibc mallopt: no mmap, no trim (as the Rust side)")
    if extra:
        extra(ap)
    a = ap.parse_args()
    if a.retain_freed_memory:
        retain_freed_memory()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    return a


def requests():
    """The Rust side's requests, one line each: yields (what, all words of the line)."""
    import sys

    for line in sys.stdin:
        parts = line.split()
        if parts:
            yield parts[0], parts
