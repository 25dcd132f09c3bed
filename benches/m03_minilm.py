"""PyTorch twin of benches/m03_minilm.rs: all-MiniLM-L6-v2 through Hugging Face
transformers' BertModel (SDPA attention), eager mode, fp32. Forward: mean-pooled embeddings of a (32, 128) batch under
no_grad. Fine-tuning step: BertModel + dropout + linear head on mean pooling, AdamW, batch 16 x 128.

Driven by bench.rs over stdin/stdout: request lines "forward N" / "train N" (N iterations), one
JSON line {"what", "per_s"} back (sentences per second).
Run by hand: echo "forward 3" | .venv/bin/python benches/m03_minilm.py"""
import json
import pathlib
import sys
import time

import torch
from transformers import BertModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402

MODEL = pathlib.Path(__file__).resolve().parents[1] / "data" / "all-MiniLM-L6-v2"


class Head(torch.nn.Module):
    def __init__(self, bert, classes=5):
        super().__init__()
        self.bert, self.drop = bert, torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(bert.config.hidden_size, classes)

    def forward(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return self.head(self.drop((h * m).sum(1) / m.sum(1)))


def main():
    a = pytwin.setup()
    torch.manual_seed(0)
    # transformers' default attention for BERT is torch's scaled_dot_product_attention, the same
    # fused kernel the Rust side calls.
    bert = BertModel.from_pretrained(MODEL, attn_implementation="sdpa")
    model = Head(bert)
    g = torch.Generator().manual_seed(0)
    fx = torch.randint(1000, 30000, (32, 128), generator=g)
    fm = torch.ones_like(fx)
    tx = torch.randint(1000, 30000, (16, 128), generator=g)
    tm = torch.ones_like(tx)
    ty = torch.randint(0, 5, (16,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    for line in sys.stdin:
        what, n = line.split()
        n = int(n)
        t = time.perf_counter()
        if what == "forward":
            model.eval()
            with torch.no_grad():
                for _ in range(n):
                    h = bert(input_ids=fx, attention_mask=fm).last_hidden_state
                    e = torch.nn.functional.normalize((h * fm.unsqueeze(-1)).sum(1) / fm.sum(1, keepdim=True), dim=1)
            per_s = n * 32 / (time.perf_counter() - t)
        else:
            model.train()
            for _ in range(n):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(tx, tm), ty).backward()
                opt.step()
            per_s = n * 16 / (time.perf_counter() - t)
        print(json.dumps({"what": what, "per_s": per_s}), flush=True)


if __name__ == "__main__":
    main()
