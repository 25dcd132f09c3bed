"""Python twin of benches/lora_sft.rs: one LoRA instruction-tuning step of SmolLM2-135M-Instruct in
Hugging Face transformers + peft, loaded from the same GGUF, on the batch the Rust side wrote.

Driven over stdin/stdout, one JSON line {"what", "value"} per request:
  load DTYPE R ALPHA   the model in DTYPE (f32 or bf16) with peft's LoRA r R, lora_alpha ALPHA,
                       dropout 0.05 on the seven projections (the adapter kept in fp32, peft's
                       default), and AdamW (lr 1e-3, no weight decay) over it (value: seconds)
  step FILE N          N optimizer steps on the batch in FILE (JSON: ids and targets, B x T,
                       -100 where no loss): forward with the base in DTYPE (no autocast: peft
                       casts x to the adapter's fp32 and back, as the course's LoRA does), the
                       loss in fp32, backward, AdamW (value: tokens per second, B x T a step,
                       padding included)
"""
import json
import pathlib
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pytwin  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIR, GGUF = ROOT / "data" / "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    pytwin.setup()
    model = opt = None
    for what, parts in pytwin.requests():
        value = 0.0
        if what == "load":
            t = time.perf_counter()
            bf16 = parts[1] == "bf16"
            base = AutoModelForCausalLM.from_pretrained(DIR, gguf_file=GGUF, dtype=torch.bfloat16 if bf16 else torch.float32)
            cfg = LoraConfig(r=int(parts[2]), lora_alpha=float(parts[3]), lora_dropout=0.05, target_modules=TARGETS,
                             bias="none", task_type="CAUSAL_LM")
            model = get_peft_model(base, cfg)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
            value = time.perf_counter() - t
        elif what == "step":
            batch = json.loads(pathlib.Path(parts[1]).read_text())
            ids, targets = torch.tensor(batch["ids"]), torch.tensor(batch["targets"])
            n = int(parts[2])
            t = time.perf_counter()
            for _ in range(n):
                logits = model(input_ids=ids).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            value = n * ids.numel() / (time.perf_counter() - t)
        print(json.dumps({"what": what, "value": value}), flush=True)


if __name__ == "__main__":
    main()
