"""PyTorch eager twin of benches/linear.rs: F.linear(x, w, b) on the CPU in float32, forward
(no_grad) and forward+backward (autograd with x, w and b requiring grad, their .grad set to None
before each step, PyTorch's zero_grad default), backward from (y * up).sum() as the Rust side
must (tch cannot hand backward an upstream gradient).

Driven by the Rust benchmark over stdin/stdout: request lines "<pass> <M> <K> <N> <reps>" with
pass "forward" or "forward_backward"; one JSON line {"pass", "ms"} back, the mean milliseconds
per call over reps calls.
Run by hand: echo "forward_backward 1024 256 768 10" | .venv/bin/python benches/linear.py"""
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402


def main():
    pytwin.setup()
    inputs = {}
    for line in sys.stdin:
        pass_, m, k, n, reps = line.split()
        m, k, n, reps = int(m), int(k), int(n), int(reps)
        if (m, k, n) not in inputs:
            inputs.clear()
            g = torch.Generator().manual_seed(0)
            x = torch.randn(m, k, generator=g).requires_grad_(True)
            w = (torch.randn(n, k, generator=g) * k**-0.5).requires_grad_(True)
            b = torch.zeros(n).requires_grad_(True)
            up = torch.randn(m, n, generator=g)
            inputs[(m, k, n)] = (x, w, b, up)
        x, w, b, up = inputs[(m, k, n)]
        start = time.perf_counter()
        for _ in range(reps):
            if pass_ == "forward":
                with torch.no_grad():
                    F.linear(x, w, b)
            else:
                x.grad = w.grad = b.grad = None
                (F.linear(x, w, b) * up).sum().backward()
        ms = (time.perf_counter() - start) * 1e3 / reps
        print(json.dumps({"pass": pass_, "ms": ms}), flush=True)


if __name__ == "__main__":
    main()
