"""One SmolLM2-135M training step (forward + backward + AdamW) on 16 TOFU rows, fp32 against bf16 autocast,
on this machine's CPU. Why the `real` profiles train in fp32: on a CPU without bf16 units (AVX2 only) the
autocast step is emulated and many times slower.

    python bench/cpu_bf16_step.py            # prints seconds per step for fp32 and bf16
"""
import time

import torch

from lab.data import qa_batches, tofu_subset
from lab.models import load_model


def step_seconds(model, batch, dtype) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    t = time.perf_counter()
    with ctx:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t


if __name__ == "__main__":
    model, tok = load_model("smollm2-135m")
    model.train()
    bench = tofu_subset(5, 5, extras=False)
    batches = list(qa_batches(tok, bench.train_full, 16, shuffle=True, seed=0, max_length=512))[:3]
    step_seconds(model, batches[0], None)                       # warm-up
    print(f"fp32: {step_seconds(model, batches[1], None):.1f} s/step  (threads {torch.get_num_threads()})")
    print(f"bf16 autocast: {step_seconds(model, batches[2], torch.bfloat16):.1f} s/step")
