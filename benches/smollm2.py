"""Python twin of benches/smollm2.rs: SmolLM2-135M-Instruct in Hugging Face transformers, loaded
from the same GGUF (`gguf_file=`, dequantized to fp32 or bf16), batch 1.

Driven by the Rust benchmark over stdin/stdout, one JSON line {"what", "value"} per request:
  load f32|bf16            load the model in that dtype (value: seconds)
  prefill IDS              one forward over the comma-separated token ids with a fresh cache
                           (value: prompt tokens per second)
  decode IDS N             prefill, then N greedy tokens one at a time through the model's
                           KV cache, as generate() does without its bookkeeping (value: tokens
                           per second over the N - 1 tokens after the first)
Run by hand: printf 'load f32\\nprefill 1,2,3\\n' | .venv/bin/python benches/smollm2.py
"""
import json
import pathlib
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIR, GGUF = ROOT / "data" / "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    pytwin.setup()
    model = None
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        what, value = parts[0], 0.0
        with torch.inference_mode():
            if what == "load":
                t = time.perf_counter()
                dtype = torch.bfloat16 if parts[1] == "bf16" else torch.float32
                model = AutoModelForCausalLM.from_pretrained(DIR, gguf_file=GGUF, dtype=dtype).eval()
                value = time.perf_counter() - t
            elif what == "prefill":
                ids = torch.tensor([[int(i) for i in parts[1].split(",")]])
                t = time.perf_counter()
                model(ids, use_cache=True)
                value = ids.shape[1] / (time.perf_counter() - t)
            elif what == "decode":
                ids = torch.tensor([[int(i) for i in parts[1].split(",")]])
                n = int(parts[2])
                out = model(ids, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(n - 1):
                    out = model(nxt, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                value = (n - 1) / (time.perf_counter() - t)
        print(json.dumps({"what": what, "value": value}), flush=True)


if __name__ == "__main__":
    main()
