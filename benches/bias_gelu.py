"""PyTorch eager twin of benches/bias_gelu.rs: F.gelu(x + b, approximate="tanh") on the
CPU, forward and forward+backward, same sizes, same timing rule (median of repeats).
Prints one JSON object per line: {"rows", "cols", "dtype", "pass", "ms"}.
Run: .venv/bin/python benches/bias_gelu.py [--threads N] [--quick]"""
import json
import pathlib
import sys
import statistics
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402

SIZES = [(256, 1024), (2048, 2048), (4096, 4096), (8192, 4096)]


def median_ms(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    a = pytwin.setup(lambda ap: ap.add_argument("--quick", action="store_true"))
    torch.manual_seed(0)
    sizes = SIZES[:2] if a.quick else SIZES
    for rows, cols in sizes:
        reps = 5 if rows * cols >= 1 << 24 else 20
        x = torch.randn(rows, cols)
        b = torch.randn(cols)
        g = torch.randn(rows, cols)

        def fwd():
            with torch.no_grad():
                F.gelu(x + b, approximate="tanh")

        xr = x.clone().requires_grad_(True)
        br = b.clone().requires_grad_(True)

        def fwd_bwd():
            xr.grad = None
            br.grad = None
            F.gelu(xr + br, approximate="tanh").backward(g)

        for name, fn in [("forward", fwd), ("forward_backward", fwd_bwd)]:
            print(json.dumps({"rows": rows, "cols": cols, "dtype": "float32", "pass": name, "ms": median_ms(fn, reps)}), flush=True)


if __name__ == "__main__":
    main()
