"""`training.unlikelihood_alpha`'s pass over the LM head (tasks/engine/unlikelihood.py `head_loss`), timed forward +
backward on one step's positions, against the same pass at alpha 0 (its cross-entropy alone), an older version of
the file (`--baseline`), and Liger's fused linear cross-entropy (what stage 4 runs without unlikelihood; CUDA only).

Token ids are drawn Zipf-like (a ~1/rank law over the vocabulary, as text is) in samples of `--sample-len` tokens, so
a position's candidates (the distinct tokens its sample wrote so far) number what they do in training (a few hundred
on the demo-gpu rows).

    PYTHONPATH=$PWD python bench/unlikelihood_speed.py                       # Gemma-3-270M's head: d 640, vocab 262,144
    git show 7b810f5:tasks/engine/unlikelihood.py > /tmp/ul_dense.py         # the dense pass setting p ran (2026-12-06)
    PYTHONPATH=$PWD python bench/unlikelihood_speed.py --baseline /tmp/ul_dense.py --positions 32768 --liger
    PYTHONPATH=$PWD python bench/unlikelihood_speed.py --positions 32768 --continuations   # + training.unlikelihood_candidates=continuations

Prints one JSON line per variant: median seconds of `--repeats` timed calls after one warm-up, the peak memory the
call added (CUDA), and the loss (all variants on the same inputs: they must agree, but for `--continuations`, another
candidate set, whose loss is its own; its `pairs` are the candidate pairs each set scores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time


def inputs(positions: int, d: int, vocab: int, sample_len: int, device: str, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(positions, d, generator=g) * 0.5).to(device, dtype)
    weight = (torch.randn(vocab, d, generator=g) * d ** -0.5).to(device, dtype)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    context = torch.multinomial(1.0 / ranks, positions, replacement=True, generator=g)
    labels = torch.roll(context, -1)
    labels[torch.rand(positions, generator=g) < 0.3] = -100  # prompts and turns not trained on
    segment = torch.arange(positions) // sample_len
    labels[(torch.arange(positions) + 1) % sample_len == 0] = -100  # a sample's last position: nothing to predict
    return hidden, weight, labels.to(device), context.to(device), segment.to(device)


def load(path: str):
    spec = importlib.util.spec_from_file_location("unlikelihood_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(fn, repeats: int, device: str):
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    return statistics.median(times), peak, float(loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=4096, help="positions of one micro-batch (demo-gpu: 32,768)")
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--sample-len", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=None, help="positions a chunk (default: what attach_unlikelihood picks)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="another version of tasks/engine/unlikelihood.py to time beside this one")
    ap.add_argument("--liger", action="store_true", help="also Liger's fused linear cross-entropy (CUDA)")
    ap.add_argument("--continuations", action="store_true", help="also training.unlikelihood_candidates=continuations")
    a = ap.parse_args()

    import torch

    from tasks.engine import unlikelihood

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden, weight, labels, context, segment = inputs(a.positions, a.d, a.vocab, a.sample_len, device, dtype)
    chunk = a.chunk or unlikelihood.default_chunk(a.vocab)
    trained = int((labels != -100).sum())

    def run(mod, alpha, **kw):
        def fn():
            h = hidden.detach().requires_grad_()
            loss, _, _ = mod.head_loss(h, weight, labels, context, segment, alpha=alpha, chunk=chunk, **kw)
            loss.backward()
            return loss.detach() / trained
        return fn

    variants = [("this, alpha %g" % a.alpha, run(unlikelihood, a.alpha)), ("this, alpha 0 (cross-entropy)", run(unlikelihood, 0.0))]
    if a.continuations:
        variants.append((f"this, alpha {a.alpha:g}, continuations", run(unlikelihood, a.alpha, candidates="continuations")))
        for mode, plan in unlikelihood.PLANS.items():
            spans, _ = plan(context, labels, segment, a.vocab, -100, chunk, torch.empty(0, dtype=torch.long, device=device))
            print(json.dumps({"candidates": mode, "pairs": sum(size for _, _, size in spans), "trained": trained}))
    if a.baseline:
        old = load(a.baseline)
        variants.append((f"{a.baseline}, alpha {a.alpha:g}", run(old, a.alpha)))
    if a.liger and device == "cuda":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger():
            h = hidden.detach().requires_grad_()
            loss = lce(weight, h, labels)
            loss.backward()
            return loss.detach() / trained
        variants.append(("liger fused linear cross-entropy", liger))
    for name, fn in variants:
        seconds, peak, loss = timed(fn, a.repeats, device)
        print(json.dumps({"variant": name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "positions": a.positions,
                          "vocab": a.vocab, "d": a.d, "chunk": chunk, "seconds": round(seconds, 4), "peak_gib": peak and round(peak, 3),
                          "loss_per_token": round(loss, 5)}))


if __name__ == "__main__":
    main()
