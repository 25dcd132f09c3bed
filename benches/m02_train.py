"""PyTorch twin of benches/m02_train.rs: the same MLP and CNN, AdamW, batch 128, eager mode,
and a torch DataLoader doing the same per-example work (bytes -> normalised floats) over MNIST.
Driven by bench.rs over stdin/stdout (one request line in, one JSON line {"what", "samples_per_s"} out),
so that the two sides take turns and this shared machine's drift hits both alike.
Run by hand: echo "train_cnn 30" | .venv/bin/python benches/m02_train.py"""
import json
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 256), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(256, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(1600, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 10))


class Trainer:
    """One model, its AdamW and a fixed batch; `run(steps)` times that many training steps."""

    def __init__(self, model, batch=128):
        torch.manual_seed(0)
        self.model, self.batch = model, batch
        self.x = torch.randn(batch, 1, 28, 28)
        self.y = torch.randint(0, 10, (batch,))
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        self.loss_fn = nn.CrossEntropyLoss()
        model.train()

    def run(self, steps):
        t = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad()
            self.loss_fn(self.model(self.x), self.y).backward()
            self.opt.step()
        return steps * self.batch / (time.perf_counter() - t)


class Mnist(Dataset):
    def __init__(self, path):
        raw = open(path, "rb").read()
        self.images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = (torch.from_numpy(self.images[i].astype(np.float32)) / 255.0 - 0.1307) / 0.3081
        return x.unsqueeze(0), i % 10


def loader_speed(workers, batches):
    dl = DataLoader(Mnist("data/mnist/train-images-idx3-ubyte"), batch_size=128, shuffle=True, num_workers=workers)
    t = time.perf_counter()
    n = 0
    for k, (x, _) in enumerate(dl):
        n += x.shape[0]
        if k + 1 == batches:
            break
    return n / (time.perf_counter() - t)


if __name__ == "__main__":
    a = pytwin.setup()  # then requests on stdin: "train_mlp STEPS", "train_cnn STEPS", "loader_workersN BATCHES"
    trainers = {}
    for line in sys.stdin:
        what, n = line.split()
        if what.startswith("train_"):
            if what not in trainers:
                trainers[what] = Trainer({"train_mlp": mlp, "train_cnn": cnn}[what]())
            speed = trainers[what].run(int(n))
        else:
            speed = loader_speed(int(what.removeprefix("loader_workers")), int(n))
        print(json.dumps({"what": what, "samples_per_s": speed}), flush=True)
