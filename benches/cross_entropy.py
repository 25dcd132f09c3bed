"""PyTorch eager twin of benches/cross_entropy.rs: F.cross_entropy(x, t, ignore_index=-100)
on the CPU in float32, forward (no_grad) and forward+backward (autograd, x.grad set to None
before each step, PyTorch's zero_grad default).

Driven by the Rust benchmark over stdin/stdout: request lines "<pass> <rows> <cols> <reps>" with
pass "forward" or "forward_backward"; one JSON line {"pass", "rows", "cols", "ms"} back, the mean
milliseconds per call over reps calls.
Run by hand: echo "forward_backward 8192 65 10" | .venv/bin/python benches/cross_entropy.py"""
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402


def main():
    a = pytwin.setup()
    inputs = {}  # (rows, cols) -> (x, t), made once per size
    for line in sys.stdin:
        pass_, rows, cols, reps = line.split()
        rows, cols, reps = int(rows), int(cols), int(reps)
        if (rows, cols) not in inputs:
            inputs.clear()  # one size at a time: the largest is 200 MiB of logits
            g = torch.Generator().manual_seed(0)
            x = torch.randn(rows, cols, generator=g).requires_grad_(True)
            t = torch.randint(0, cols, (rows,), generator=g)
            inputs[(rows, cols)] = (x, t)
        x, t = inputs[(rows, cols)]
        start = time.perf_counter()
        for _ in range(reps):
            if pass_ == "forward":
                with torch.no_grad():
                    F.cross_entropy(x, t, ignore_index=-100)
            else:
                x.grad = None
                F.cross_entropy(x, t, ignore_index=-100).backward()
        ms = (time.perf_counter() - start) * 1e3 / reps
        print(json.dumps({"pass": pass_, "rows": rows, "cols": cols, "ms": ms}), flush=True)


if __name__ == "__main__":
    main()
