"""PyTorch twin of benches/m04_gpt.rs: the same GPT (nanoGPT's model with SDPA attention,
tanh GELU, tied head, GPT-2 init) trained on the same Shakespeare character tokens
(data/lm/shakespeare-char, written by m04_amp), AdamW with decay groups, clipping at 1.0, in
eager mode or under torch.compile, fp32 or bf16 autocast.

Driven by bench.rs over stdin/stdout, one JSON line {"what", "value"} per request:
  init eager|compile LAYERS HEADS WIDTH BLOCK BATCH   build model and optimizer (value 0)
  train fp32|bf16 N                                   N optimizer steps; value = tokens/s
  eval                                                value = mean val loss over 20 fixed batches
Run by hand: printf 'init eager 4 4 128 64 12\ntrain fp32 5\neval\n' | .venv/bin/python benches/m04_gpt.py
"""
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402

DATA = ROOT / "data" / "lm" / "shakespeare-char"


class Attention(nn.Module):
    def __init__(self, c, h, layers):
        super().__init__()
        self.c_attn, self.c_proj, self.h = nn.Linear(c, 3 * c), nn.Linear(c, c), h
        self.c_proj.res = True

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, c, h, layers):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(c), Attention(c, h, layers), nn.LayerNorm(c)
        self.c_fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.mlp_proj.res = True

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, block, layers, heads, width):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.h = nn.ModuleList([Block(width, heads, layers) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        for m in self.modules():  # GPT-2 init, scaled residual projections
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * layers) if getattr(m, "res", False) else 0.02
                nn.init.normal_(m.weight, 0.0, std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.h:
            x = b(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def batch(data, n, block, rng):
    ix = rng.integers(0, len(data) - block - 1, n)
    w = torch.from_numpy(np.stack([data[i:i + block + 1] for i in ix]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def main():
    a = pytwin.setup()
    meta = json.loads((DATA / "meta.json").read_text())
    train = np.memmap(DATA / "train.bin", dtype=np.int16, mode="r")
    val = np.memmap(DATA / "val.bin", dtype=np.int16, mode="r")
    st = {}
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        what, value = parts[0], 0.0
        if what == "init":
            mode, (layers, heads, width, block, bs) = parts[1], map(int, parts[2:7])
            torch.manual_seed(0)
            model = GPT(meta["vocab_size"], block, layers, heads, width)
            decay = [p for p in model.parameters() if p.dim() >= 2]
            no_decay = [p for p in model.parameters() if p.dim() < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                    lr=1e-3, betas=(0.9, 0.99))
            fwd = torch.compile(model) if mode == "compile" else model
            st = dict(model=model, fwd=fwd, opt=opt, block=block, bs=bs, rng=np.random.default_rng(0))
        elif what == "train":
            prec, n = parts[1], int(parts[2])
            t = time.perf_counter()
            for _ in range(n):
                x, y = batch(train, st["bs"], st["block"], st["rng"])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                    loss = st["fwd"](x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(st["model"].parameters(), 1.0)
                st["opt"].step()
                st["opt"].zero_grad(set_to_none=True)
            value = n * st["bs"] * st["block"] / (time.perf_counter() - t)
        elif what == "eval":
            rng = np.random.default_rng(1)
            with torch.no_grad():
                value = sum(st["model"](*batch(val, st["bs"], st["block"], rng)).item() for _ in range(20)) / 20
        print(json.dumps({"what": what, "value": value}), flush=True)


if __name__ == "__main__":
    main()
