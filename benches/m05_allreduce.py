"""PyTorch twin of benches/m05_allreduce.rs: one rank of a torch.distributed (Gloo) job that
measures allreduce time from 1 KB to 64 MB and the time of a DistributedDataParallel training
step of m05's CNN, with the same iteration-count logic as the Rust ranks. bench.rs starts it as
2 processes through course::launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, env://
rendezvous); rank 0 writes the result JSON.
Run by hand: .venv/bin/torchrun --nproc-per-node 2 benches/m05_allreduce.py --threads 1 --quick --result /tmp/t.json

SyncBatchNorm: torch.nn.SyncBatchNorm raises "SyncBatchNorm expected input tensor to be on GPU"
for CPU input (and aten::batch_norm_stats has no CPU kernel), so the DDP step here uses plain
BatchNorm2d; bench.rs times its own step with plain batch norm for the comparison."""
import json
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402


def cnn():
    """m05's LeNet (course::models::LeNet, conv_bias false, dropout 0)."""
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(1600, 256), nn.ReLU(), nn.Linear(256, 10))


def timed_allreduce(t, warmup, iters):
    """bench.rs's `ProcessGroup::allreduce_bandwidth`: warm-up, barrier, then `iters` sums."""
    for _ in range(warmup):
        dist.all_reduce(t)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(max(iters, 1)):
        dist.all_reduce(t)
    return (time.perf_counter() - t0) / max(iters, 1)


def agreed_iters(probe, target_s, lo, hi):
    """Every rank's estimate of the count that takes `target_s`, averaged so all ranks agree."""
    n = torch.tensor([min(max(target_s / max(probe, 1e-6), lo), hi)], dtype=torch.float64)
    dist.all_reduce(n)
    return int(n.item()) // dist.get_world_size()


def allreduce_sweep(max_bytes, target_s):
    points = []
    nbytes = 1024
    while nbytes <= max_bytes:
        t = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
        probe = timed_allreduce(t, 1, 2)
        iters = agreed_iters(probe, target_s, 5, 20000)
        secs = timed_allreduce(t, 2, iters)
        points.append({"bytes": nbytes, "iters": iters, "secs": secs})
        nbytes *= 4
    return points


def ddp_step(steps, batch):
    """Seconds per DDP step (forward, backward with DDP's bucketed allreduce, AdamW) on rank 0."""
    torch.manual_seed(0)
    # broadcast_buffers=False: the Rust Ddp does not re-broadcast batch-norm buffers every
    # forward, so neither side does that extra collective.
    model = DDP(cnn(), broadcast_buffers=False)
    model.train()
    # course::optim::decay_groups: decay on matrices and kernels, none on biases and BN scales.
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 1e-4},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def run(n):
        for _ in range(n):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    run(3)  # warm-up: allocations, DDP's first-iteration bucket rebuild, AdamW state
    dist.barrier()
    t0 = time.perf_counter()
    run(steps)
    return (time.perf_counter() - t0) / steps


def main():
    def extra(ap):
        ap.add_argument("--quick", action="store_true", help="sizes up to 256 KB, short timings, 3 steps")
        ap.add_argument("--result", required=True, help="rank 0 writes the JSON result here")

    a = pytwin.setup(extra)
    dist.init_process_group("gloo")  # env:// from the launcher's variables
    max_bytes, target_s, steps = (256 << 10, 0.03, 3) if a.quick else (64 << 20, 0.3, 20)
    points = allreduce_sweep(max_bytes, target_s)
    step = ddp_step(steps, 64)
    if dist.get_rank() == 0:
        out = {
            "side": "pytorch",
            "torch": torch.__version__,
            "world": dist.get_world_size(),
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "allreduce": points,
            "step_iters": steps,
            "ddp_step_bn": step,
            "ddp_step_syncbn": None,
        }
        tmp = a.result + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, a.result)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
