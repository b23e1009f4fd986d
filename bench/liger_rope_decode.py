"""Why stage 5 answered garbage on the GPU after stage 4 (issue 18, showcase run 4), reproduced on a CPU by emulating
the addressing of liger-kernel 0.8.5's RoPE kernel (`liger_kernel/ops/rope.py`: row `pid` of q/k starts at
`pid * q.stride(1)` after `q.transpose(1, 2).contiguous()`; heads at `h * head_dim`; rotated in place).

Gemma-3 normalises q and k before RoPE; Liger's RMSNorm returns fresh memory, so a one-token decode step hands RoPE a
(B, H, 1, D) tensor whose transpose is "contiguous" with stride(1) = D instead of H x D: for B > 1 the kernel rotates
the wrong rows. Training (sequence length > 1) and one-row decoding are unaffected.

    python bench/liger_rope_decode.py [MODEL_DIR]   # default: the converted Gemma-3-270M base in artifacts/cache/models

Prints greedy answers of a batch of two prompts: transformers' own kernels, then with the fresh-memory norm and the
emulated RoPE addressing (what stage 5 ran when Liger's patches leaked into it), plus the decode check of each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def liger_like_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """RoPE with liger-kernel 0.8.5's memory addressing (the math is the usual rotate-half)."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    batch, length, _, dim = q.shape
    for t in (q, k):
        flat, heads, row_stride = t.as_strided((t.numel(),), (1,)), t.shape[2], t.stride(1)
        for pid in range(batch * length):
            b, pos = divmod(pid, length)
            c, s = (x[b if x.shape[0] > 1 else 0, pos, : dim // 2] for x in (cos, sin))
            for h in range(heads):
                at = pid * row_stride + h * dim
                x1, x2 = flat[at: at + dim // 2].clone(), flat[at + dim // 2: at + dim].clone()
                flat[at: at + dim // 2] = x1 * c - x2 * s
                flat[at + dim // 2: at + dim] = x2 * c + x1 * s
    return q.transpose(1, 2), k.transpose(1, 2)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.gemma3 import modeling_gemma3 as g3

    from tasks.evaluate import decode_check

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else next(
        p.parent for p in sorted(Path("artifacts/cache/models").glob("*/config.json")) if '"gemma3_text"' in p.read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = ["### User:\nWhat is the capital of France?\n\n### Assistant:\n",
               "### User:\nGive me three tips for staying healthy.\n\n### Assistant:\n"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    rows = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]

    def answers(tag: str) -> None:
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        print(f"{tag}: decode check {decode_check(model, rows, new, 'cpu')}")
        for text in tok.batch_decode(new, skip_special_tokens=True):
            print("   ", repr(text))

    norm = g3.Gemma3RMSNorm.forward
    with torch.inference_mode():
        answers("transformers' kernels")
        g3.Gemma3RMSNorm.forward = lambda self, x: torch.empty(x.shape, dtype=x.dtype).copy_(norm(self, x))  # Liger's: fresh memory
        g3.apply_rotary_pos_emb = liger_like_rope
        answers("fresh-memory norm + liger-kernel 0.8.5's RoPE addressing")


if __name__ == "__main__":
    main()
