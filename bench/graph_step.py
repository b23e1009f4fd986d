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

Mode `eager-dropout-inmatmul` (opt-in) is eager-dropout with the mask made inside the LoRA-A matmuls
(`fuse_lora(model, dropout="inmatmul")`, tasks/engine/lora_kernels.py) instead of the seeded kernel's separate passes.
Before it runs, `inmatmul_check` compares the kernels with the torch reference on this GPU (the same mask, the
formula in bf16) and times one LoRA-A forward + backward per mode at the model's shapes (graph_step.json "meta").

    python3 bench/graph_step.py --out $OUT                       # Mistral-7B shapes, 32 layers, 6 steps per mode
    python3 bench/graph_step.py --layers 4 --steps 3 --out $OUT  # a smoke test (~1 min)
    python3 bench/graph_step.py --modes eager,eager-dropout,eager-dropout-inmatmul --out $OUT  # dropout in the matmul

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
AUTOCAST_CACHE = False  # --autocast-cache: Trainer's autocast (accelerate) keeps torch's default cache_enabled=True


def build(layers: int, shapes: str, dropout: float, preserve_rng: bool = False):
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
    enable_checkpointing(model, {**CHECKPOINTING, "preserve_rng_state": preserve_rng})
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


def packed(data: list[torch.Tensor], device: str = "cuda") -> list[dict]:
    """The same micro-batches as the Trainer's fused runs feed them (`--inputs packed`): the MICRO rows of each
    concatenated into one (1, MICRO x MAX_LEN) row by the engine's PaddingFreeCollator (position_ids restarting per
    sample, cu_seq_lens, each sample's first label -100: the same 4 x 2,047 trained tokens as `labels=ids`), on the
    device before the steps (the Trainer copies them at each step's start; that copy is not what this measures)."""
    from tasks.engine.fastpath import PaddingFreeCollator

    collate = PaddingFreeCollator()
    out = []
    for ids in data:
        batch = collate([{"input_ids": row, "labels": row} for row in ids.tolist()])
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return out


def forward_loss(model, batch) -> torch.Tensor:
    """`model(...).loss` of one micro-batch: a (MICRO, MAX_LEN) tensor of ids (the rows) or a packed dict."""
    if isinstance(batch, dict):
        return model(**batch).loss
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def train_steps(model, optimizer, data: list[torch.Tensor], steps: int) -> tuple[list[float], list[float]]:
    """`steps` optimizer steps of ACCUM micro-batches each; (seconds per step, mean loss per step)."""
    seconds, losses = [], []
    for s in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        total = torch.zeros((), device="cuda")
        for m in range(ACCUM):
            ids = data[(s * ACCUM + m) % len(data)]
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=AUTOCAST_CACHE):
                loss = forward_loss(model, ids) / ACCUM
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


def inmatmul_check(shapes: str, p: float = 0.05, seed: int = 1234) -> dict:
    """The in-matmul dropout on this GPU, before its timed mode: which backend runs; each kernel against the torch
    reference (the same mask, bf16: relative error of the forward, grad_x, grad_A; grad_x zero exactly where the
    reference drops); milliseconds of one LoRA-A forward + backward per dropout mode at the model's group shapes
    (r16: q/k/v 48 rows of A, gate/up 32, o 16 over `hidden`; down 16 over `intermediate`; 8,192 tokens).

    `ok` says the kernels themselves ran and matched: a kernel that fails falls back to the torch reference (lora.py,
    one warning), which this check would then compare with itself and time as "inmatmul". So a fallback during the
    check (a new entry in `inmatmul_failures`) makes the result not-ok, with the backend that then ran and the kernel's
    error, and no in-matmul time is recorded from the reference."""
    from tasks.engine.lora import STORED, LoraA, LoraAInMatmul, dropout_backend, dropout_grad_a, dropout_grad_x, dropout_xa, \
        inmatmul_failures, inmatmul_keep_mask, kept_scale

    cfg = SHAPES[shapes][1]
    hidden, inter, r = cfg["hidden_size"], cfg["intermediate_size"], LORA["r"]
    failed_before = len(inmatmul_failures())
    res = {"backend": dropout_backend("cuda", "inmatmul")}
    if res["backend"] != "triton":
        res.update(ok=False, error="no in-matmul kernels here (no Triton, or they failed earlier in this process): nothing "
                                   "to check; the timed mode runs the torch reference")
        return res

    def kernels_failed(where: str) -> bool:
        new = inmatmul_failures()[failed_before:]
        if new:
            res.update(ok=False, backend=dropout_backend("cuda", "inmatmul"),
                       error=f"the in-matmul kernels failed {where} and the torch reference ran instead: {new[0]}")
        return bool(new)

    def rel(u, v):
        return float((u.float() - v).norm() / v.norm())

    m, k, n = 8192 + 37, hidden + 8, 3 * r + 5  # odd sizes: partial tiles on every axis
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(n, k, device="cuda") * 0.02
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    keep = inmatmul_keep_mask(m, k, p, seed, x.device)
    xd = x.float() * keep * kept_scale(p)
    ab = a.bfloat16().float()
    gx = dropout_grad_x(g, a, p, seed, torch.bfloat16)
    res.update(drop_share=round(1 - keep.float().mean().item(), 5),
               rel_err_xa=rel(dropout_xa(x, a, p, seed, torch.bfloat16), xd @ ab.t()),
               rel_err_grad_x=rel(gx, (g.float() @ ab) * keep * kept_scale(p)),
               rel_err_grad_a=rel(dropout_grad_a(g, x, p, seed), g.float().t() @ xd),
               grad_x_zero_where_dropped=bool((gx[~keep] == 0).all()))
    del x, a, g, keep, xd, gx
    if kernels_failed("in the check"):  # the numbers above compare the reference with itself
        return res
    # bf16 outputs round at ~2^-9 relative: 1e-2 leaves a margin of ~4x (docs/PERF_NOTES.md's prediction says < 1e-2)
    res["ok"] = res["grad_x_zero_where_dropped"] and abs(res["drop_share"] - p) < 0.002 and \
        max(res["rel_err_xa"], res["rel_err_grad_x"], res["rel_err_grad_a"]) < 1e-2

    def fwd_bwd_ms(width: int, rows: int, mode: str) -> float:
        xs = torch.randn(8192, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(rows, width, device="cuda") * 0.02).requires_grad_()
        gs = torch.randn(8192, rows, device="cuda", dtype=torch.bfloat16)

        def once():
            if mode == "inmatmul":
                out = LoraAInMatmul.apply(xs, w, p, seed, torch.bfloat16)
            else:
                out = LoraA.apply(xs, w, 0.0 if mode == "none" else p, STORED if mode == "stored" else seed, torch.bfloat16)
            out.backward(gs)
        for _ in range(3):
            once()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            once()
        end.record()
        torch.cuda.synchronize()
        return round(start.elapsed_time(end) / 20, 4)

    groups = (("qkv", hidden, 3 * r), ("gate_up", hidden, 2 * r), ("o", hidden, r), ("down", inter, r))
    res["fwd_bwd_ms"] = {}
    for label, width, rows in groups:  # other N than the check's: other kernel specializations, which may fail to compile
        times = {mode: fwd_bwd_ms(width, rows, mode) for mode in ("none", "seeded", "inmatmul")}
        if kernels_failed(f"at {label} {width}x{rows}"):  # that "inmatmul" time is the reference's: not recorded
            break
        res["fwd_bwd_ms"][f"{label} {width}x{rows}"] = times
    torch.cuda.empty_cache()
    return res


def safe_inmatmul_check(shapes: str) -> dict:
    """`inmatmul_check`, its failure a result (the timed mode still runs: on the torch reference if the kernels fail)."""
    try:
        return inmatmul_check(shapes)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:600]}", "traceback": traceback.format_exc()[-3000:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shapes", default="mistral-7b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="eager,graph,eager-dropout",
                    help="comma list of eager, graph, eager-dropout, eager-dropout-inmatmul")
    ap.add_argument("--out", default=".")
    ap.add_argument("--inputs", default="rows", choices=("rows", "packed"),
                    help="rows: (MICRO, MAX_LEN) ids, sdpa causal; packed: the Trainer runs' inputs (one packed row, "
                         "position_ids, cu_seq_lens) through the engine's varlen attention (fastpath_varlen)")
    ap.add_argument("--preserve-rng", action="store_true",
                    help="checkpoint with preserve_rng_state=True, as Trainer enables it (the seeded dropout's seeds come "
                         "from the CPU generator: without it a recompute draws other masks than its forward did)")
    ap.add_argument("--autocast-cache", action="store_true", help="autocast with cache_enabled=True, as the Trainer's")
    a = ap.parse_args()
    global AUTOCAST_CACHE
    AUTOCAST_CACHE = a.autocast_cache
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = a.modes.split(",")
    if a.inputs == "packed" and "graph" in modes:
        ap.error("--inputs packed runs the eager modes only (the graphed layers replay (MICRO, MAX_LEN) rows)")
    vocab = SHAPES[a.shapes][1]["vocab_size"]
    data = batches(ACCUM * 2, vocab, seed=0)
    records, meta_extra = [], {}
    model, fused = build(a.layers, a.shapes, dropout=0.0, preserve_rng=a.preserve_rng)
    if a.inputs == "packed":
        from tasks.engine.fastpath import register_varlen_attention

        model.set_attn_implementation(register_varlen_attention())
        data = packed(data)
    log(f"{a.shapes}, {a.layers} layers: {fused} projections on the fused LoRA path")
    lora_init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for mode in [m for m in modes if m in ("eager", "graph")]:
        records.append(run_mode(mode, model, lora_init, data, a.steps, a.warmup, graphed=mode == "graph"))
    dropout_modes = {"eager-dropout": "seeded", "eager-dropout-inmatmul": "inmatmul"}
    if any(m in modes for m in dropout_modes):  # the same model with dropout 0.05 on every adapter: what dropout costs
        from tasks.engine.lora import dropout_backend, fuse_lora

        for module in model.modules():
            if hasattr(module, "lora_dropout") and "default" in getattr(module, "lora_dropout", {}):
                module.lora_dropout["default"] = torch.nn.Dropout(LORA["lora_dropout"])
        for name, mode in dropout_modes.items():
            if name not in modes:
                continue
            if mode == "inmatmul":
                meta_extra["inmatmul_check"] = safe_inmatmul_check(a.shapes)
                log(f"in-matmul dropout check: {meta_extra['inmatmul_check']}")
            fuse_lora(model, dropout=mode)  # re-reads each layer's dropout p
            rec = run_mode(name, model, lora_init, data, a.steps, a.warmup, graphed=False)
            rec.update(lora_dropout=mode, dropout_backend=dropout_backend("cuda", mode))
            records.append(rec)
    ok = {r["name"]: r for r in records if r.get("ok")}
    summary = {}
    if "eager" in ok and "graph" in ok:
        e, g = ok["eager"], ok["graph"]
        summary = {"graph_over_eager": round(g["tokens_per_s"] / e["tokens_per_s"], 4),
                   "max_rel_loss_diff": max(abs(x - y) / abs(x) for x, y in zip(e["losses"], g["losses"]))}
        log(f"graph / eager: {summary['graph_over_eager']:.3f}x; losses differ by at most {summary['max_rel_loss_diff']:.1e} (relative)")
    for name in [n for n in dropout_modes if n in ok and "eager" in ok]:
        summary[f"{name}_over_eager"] = round(ok[name]["tokens_per_s"] / ok["eager"]["tokens_per_s"], 4)
        log(f"{name} / eager: {summary[f'{name}_over_eager']:.3f}x")
    if "eager-dropout" in ok and "eager-dropout-inmatmul" in ok:  # different masks: losses close, not equal
        d, i = ok["eager-dropout"], ok["eager-dropout-inmatmul"]
        summary["inmatmul_over_seeded"] = round(i["tokens_per_s"] / d["tokens_per_s"], 4)
        summary["inmatmul_vs_seeded_max_rel_loss_diff"] = max(abs(x - y) / abs(x) for x, y in zip(d["losses"], i["losses"]))
        log(f"eager-dropout-inmatmul / eager-dropout: {summary['inmatmul_over_seeded']:.3f}x")
    meta = {"shapes": a.shapes, "layers": a.layers, "inputs": a.inputs, "preserve_rng_state": a.preserve_rng,
            "autocast_cache": a.autocast_cache, "micro": MICRO, "accum": ACCUM, "max_len": MAX_LEN, "fused_projections": fused,
            "gpu": torch.cuda.get_device_name(0), "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            **meta_extra}
    (out / "graph_step.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1))


if __name__ == "__main__":
    main()
