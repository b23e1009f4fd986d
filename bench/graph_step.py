"""Issue 19: how much of the fused engine's step is the host's, measured by taking it away — each decoder layer's
forward and backward (checkpoint recompute included) replayed as CUDA graphs, against the same layers run eagerly.

The 2026-12-03 profile of fused-full (3,503 ms a step) found 545 ms with no kernel running, 488 ms of it host-bound:
~35,000 kernels a step, each launched by Python (PEFT's wrappers, the fused LoRA functions, bitsandbytes' 4-bit
matmul, Liger's Triton kernels, autograd). A CUDA graph replays a layer's kernels with one launch. If the graphed
layers take those 488 ms away, the engine is ~1.16x faster at full length and the issue's 1.10x Unsloth target comes
within reach; if they do not, the time is the kernels' own and the next lever is fewer, larger kernels.

This is a ceiling experiment, not the engine: its own loop (no Trainer), full-length micro-batches of one fixed shape
(a graph replays fixed shapes: mixed-length packs would need one graph per pack shape and fixed-size varlen metadata),
LoRA dropout 0 (the fused path's seeded dropout draws its seed on the host, which a graph would freeze into every
replay: a graphed engine needs the seed in device memory), full recompute with `preserve_rng_state=False` (dropout 0:
nothing random to restore). The same model, LoRA init and batches run eagerly and graphed, so the per-step losses must
agree (the graphs run the same kernels); the eager loop with dropout 0.05 says what dropout itself costs.

    python3 bench/graph_step.py --out $OUT                       # Mistral-7B shapes, 32 layers, 6 steps per mode
    python3 bench/graph_step.py --layers 4 --steps 3 --out $OUT  # a smoke test (~1 min)

Writes graph_step.json (one record per mode) and prints one line per mode. Every mode runs in its own try: a capture
that fails is a result (its error recorded), not a crash.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.workload import ACCUM, GIB, LORA, MAX_LEN, MICRO, SHAPES, WORKDIR, log, versions  # noqa: E402

CHECKPOINTING = {"use_reentrant": False, "preserve_rng_state": False}


def build(layers: int, shapes: str, dropout: float):
    """The fused engine's model as stage 4 builds it on CUDA (tasks/engine/build.py): NF4 + double quant, no k-bit
    prep (norms, embeddings and LM head stay bf16: the residual stream is bf16), Liger's kernels, PEFT LoRA on the
    seven projections, `fuse_lora`, checkpointing on every layer. The first run (2026-12-04 09:45) used PEFT's k-bit prep,
    whose fp32 upcast made the eager residual stream fp32 while the graphs' bf16 placeholders cast it to bf16: a
    different computation (losses 8e-3 apart), not a measure of the host's share."""
    from peft import LoraConfig, get_peft_model

    from bench.gpu_bench import build_model
    from tasks.engine.fastpath import prepare_fast_model
    from tasks.engine.lora import fuse_lora
    from tasks.models import enable_checkpointing

    model = build_model(layers, Path(WORKDIR), shapes)
    prepare_fast_model(model)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **{**LORA, "lora_dropout": dropout}))
    fused = fuse_lora(model, dropout="seeded")
    enable_checkpointing(model, CHECKPOINTING)
    model.enable_input_require_grads()
    model.train()
    return model, fused


def decoder(model):
    base = model.get_base_model()
    return base.model  # MistralModel / LlamaModel: embed_tokens, layers, norm, rotary_emb


class LayerRunner(torch.nn.Module):
    """One decoder layer as a function of its hidden states alone (make_graphed_callables passes tensors only): the
    rotary embeddings of the fixed positions 0..MAX_LEN-1, no mask (causal attention on unpadded rows)."""

    def __init__(self, layer, position_embeddings, position_ids):
        super().__init__()
        self.layer = layer
        self.position_embeddings, self.position_ids = position_embeddings, position_ids

    def forward(self, hidden_states):
        out = self.layer(hidden_states, attention_mask=None, position_ids=self.position_ids,
                         position_embeddings=self.position_embeddings, use_cache=False)
        return out[0] if isinstance(out, tuple) else out


class GraphedSlot(torch.nn.Module):
    """What sits in `layers[i]` while graphed: the model's loop calls it with its usual keywords, which the graph fixed."""

    def __init__(self, runner, dtype: torch.dtype):
        super().__init__()
        self.runner, self.dtype = runner, dtype

    def forward(self, hidden_states, *args, **kwargs):
        if hidden_states.dtype != self.dtype:  # the graph's placeholder would cast it silently: another computation
            raise TypeError(f"hidden states arrive as {hidden_states.dtype}, the graph was captured for {self.dtype}")
        return self.runner(hidden_states)


def graph_layers(model, batch_shape: tuple[int, int]) -> list:
    """Replace every decoder layer by its graphed runner (one shared memory pool); returns the original layers."""
    dec = decoder(model)
    originals = list(dec.layers)
    bsz, seq = batch_shape
    hidden = dec.config.hidden_size
    position_ids = torch.arange(seq, device="cuda").unsqueeze(0).expand(bsz, -1)
    dtype = dec.embed_tokens.weight.dtype  # the residual stream's dtype in the eager model
    probe = torch.zeros(bsz, seq, hidden, device="cuda", dtype=dtype)
    position_embeddings = tuple(t.detach() for t in dec.rotary_emb(probe, position_ids))
    runners = tuple(LayerRunner(layer, position_embeddings, position_ids) for layer in originals)
    samples = tuple((torch.randn(bsz, seq, hidden, device="cuda", dtype=dtype, requires_grad=True),) for _ in runners)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(runners, samples, num_warmup_iters=3)
    for i, g in enumerate(graphed):
        dec.layers[i] = GraphedSlot(g, dtype)
    return originals


def ungraph_layers(model, originals: list) -> None:
    dec = decoder(model)
    for i, layer in enumerate(originals):
        dec.layers[i] = layer


def batches(n: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (MICRO, MAX_LEN), generator=g).cuda() for _ in range(n)]


def train_steps(model, optimizer, data: list[torch.Tensor], steps: int) -> tuple[list[float], list[float]]:
    """`steps` optimizer steps of ACCUM micro-batches each; (seconds per step, mean loss per step)."""
    seconds, losses = [], []
    for s in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        total = torch.zeros((), device="cuda")
        for m in range(ACCUM):
            ids = data[(s * ACCUM + m) % len(data)]
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss / ACCUM
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the same .grad tensors every step (the graphs' outputs add into them)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        losses.append(float(total))
    return seconds, losses


def run_mode(name: str, model, lora_init: dict, data, steps: int, warmup: int, graphed: bool) -> dict:
    rec = {"name": name, "graphed": graphed}
    originals = None
    try:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in lora_init:
                    p.copy_(lora_init[n])
                    p.grad = torch.zeros_like(p)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if graphed:
            t = time.perf_counter()
            originals = graph_layers(model, (MICRO, MAX_LEN))
            rec["capture_s"] = round(time.perf_counter() - t, 1)
        seconds, losses = train_steps(model, optimizer, data, steps)
        timed = seconds[warmup:]
        tokens = MICRO * MAX_LEN * ACCUM
        rec.update(ok=True, tokens_per_s=tokens * len(timed) / sum(timed), step_s=[round(x, 3) for x in seconds],
                   losses=[round(x, 5) for x in losses], peak_gib=torch.cuda.max_memory_allocated() / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
        log(f"{name}: {rec['tokens_per_s']:,.0f} tok/s, peak {rec['peak_gib']:.2f} GiB, steps {rec['step_s']}, losses {rec['losses']}")
    except Exception as e:  # a capture or replay failure is this mode's result
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}", traceback=traceback.format_exc()[-3000:])
        log(f"{name}: FAILED {rec['error']}")
    finally:
        if originals is not None:
            ungraph_layers(model, originals)
        for p in model.parameters():
            p.grad = None
        gc.collect()
        torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shapes", default="mistral-7b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="eager,graph,eager-dropout")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = a.modes.split(",")
    vocab = SHAPES[a.shapes][1]["vocab_size"]
    data = batches(ACCUM * 2, vocab, seed=0)
    records = []
    model, fused = build(a.layers, a.shapes, dropout=0.0)
    log(f"{a.shapes}, {a.layers} layers: {fused} projections on the fused LoRA path")
    lora_init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for mode in [m for m in modes if m in ("eager", "graph")]:
        records.append(run_mode(mode, model, lora_init, data, a.steps, a.warmup, graphed=mode == "graph"))
    if "eager-dropout" in modes:  # the same model with dropout 0.05 on every adapter: what the seeded dropout costs
        for module in model.modules():
            if hasattr(module, "lora_dropout") and "default" in getattr(module, "lora_dropout", {}):
                module.lora_dropout["default"] = torch.nn.Dropout(LORA["lora_dropout"])
        from tasks.engine.lora import fuse_lora

        fuse_lora(model, dropout="seeded")  # re-reads each layer's dropout p
        records.append(run_mode("eager-dropout", model, lora_init, data, a.steps, a.warmup, graphed=False))
    ok = {r["name"]: r for r in records if r.get("ok")}
    summary = {}
    if "eager" in ok and "graph" in ok:
        e, g = ok["eager"], ok["graph"]
        summary = {"graph_over_eager": round(g["tokens_per_s"] / e["tokens_per_s"], 4),
                   "max_rel_loss_diff": max(abs(x - y) / abs(x) for x, y in zip(e["losses"], g["losses"]))}
        log(f"graph / eager: {summary['graph_over_eager']:.3f}x; losses differ by at most {summary['max_rel_loss_diff']:.1e} (relative)")
    meta = {"shapes": a.shapes, "layers": a.layers, "micro": MICRO, "accum": ACCUM, "max_len": MAX_LEN, "fused_projections": fused,
            "gpu": torch.cuda.get_device_name(0), "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (out / "graph_step.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1))


if __name__ == "__main__":
    main()
