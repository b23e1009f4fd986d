"""Host (Python) cost of one training step's LoRA layers: PEFT's forward vs the fused path, on shapes so small
that the arithmetic is negligible and what is timed is the per-layer Python and autograd overhead that a GPU
step pays on its launching thread (docs/PERF_NOTES.md, the idle-time diagnosis). CPU is enough:

    python bench/lora_host_overhead.py [--layers 4] [--iters 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(layers: int, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None, attn_implementation="sdpa")
    model = MistralForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")).train()


def step_ms(model, iters: int) -> float:
    ids = torch.randint(0, 64, (1, 8))
    times = []
    for i in range(iters + 5):
        t = time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        if i >= 5:
            times.append(time.process_time() - t)
    return 1e3 * min(times)  # CPU time of this process, best of `iters`: the least disturbed by other load


def main() -> None:
    from tasks.engine.lora import fuse_lora

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=40)
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = {}
    for name, mode in (("peft", None), ("fused", "seeded"), ("fused-stored", "stored")):
        model = tiny(a.layers, 0.05)
        if mode:
            fuse_lora(model, dropout=mode)
        res[name] = step_ms(model, a.iters)
    base = tiny(a.layers, 0.05)
    base.disable_adapter_layers()  # the same model without LoRA work: what the LoRA layers add on top
    res["no-lora"] = step_ms(base, a.iters)
    for k, v in res.items():
        extra = (v - res["no-lora"]) / (a.layers * len(TARGETS))
        print(f"{k:13s} {v:7.2f} ms per fwd+recompute+bwd, {1e3 * extra:6.1f} µs of host time per LoRA projection")


if __name__ == "__main__":
    main()
