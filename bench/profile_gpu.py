"""Where a training step's GPU time goes: kernel time by category, plus the idle gaps between kernels.

Reads a torch.profiler chrome trace (kineto JSON) of one optimizer step, marked by a `qlora_step` user
annotation, and attributes every GPU kernel to a category by its name and by the CPU op that launched it
(the op's input shapes tell a LoRA matmul, which has a rank-sized operand, from a base-layer one):

    base matmul        GEMMs of the 4-bit base layers (dequantized to bf16, then cuBLAS), fwd + bwd + recompute
    LoRA matmul        GEMMs with an operand of width <= --lora-max-rank x 3 (the A and B products)
    lm head + loss     GEMMs with a vocabulary-sized operand, cross-entropy kernels
    attention          flash / varlen / sdpa kernels
    bnb dequantize     bitsandbytes' NF4 -> bf16 kernels
    dropout / RNG      dropout, bernoulli and random-number kernels
    Liger (Triton)     RMSNorm, SwiGLU, RoPE kernels
    compiled (inductor) kernels torch.compile generated (`triton_poi_/red_/per_/tem_/for_...`: training.compile's
                       fused norms, RoPE, LoRA arithmetic, activations and adds, forward and backward)
    optimizer          the (8-bit paged) AdamW kernels, gradient clipping
    copies / casts     memcpy/memset, copy_, casts, clone, cat
    add                elementwise adds (PEFT's `result + lora`)
    mul / scale        elementwise multiplies (PEFT's `* scaling`)
    other elementwise  everything else (silu, norms without Liger, reductions, fills)
    idle               time inside the step with no kernel running (launch gaps, host syncs)

Long gaps (>= 20 µs) are split further (`host` in the result): host-bound ones, where the kernel after the gap
was launched (its cudaLaunchKernel / cuLaunchKernel call ended) after the GPU went idle, so the GPU waited for
Python; the rest (waits on a sync, an event, the allocator). Host-bound stalls are summed per launching op and
per the innermost non-aten op around the launch (an autograd Function's backward, a module's annotation), and
every synchronizing runtime call in the step (cudaStreamSynchronize, cudaDeviceSynchronize, blocking memcpy...)
is counted: the question "did the fused path add host syncs or Python" gets answered by the trace.

Used by bench/gpu_bench.py --profile (one profiled step after the timed ones, per run); standalone it
summarizes a saved trace:

    python bench/profile_gpu.py trace.json [--out breakdown.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

STEP_ANNOTATION = "qlora_step"
SMALL_GAP_US = 20.0  # a gap shorter than this is kernel-launch latency; longer ones are host work or syncs

MATMUL = re.compile(r"gemm|gemv|cutlass|nvjet|xmma|cublas|sm\d\d_|ampere_|hopper_|matmul|Kernel2", re.I)
ATTENTION = re.compile(r"flash|fmha|attn|attention", re.I)
DEQUANT = re.compile(r"dequant", re.I)
DROPOUT = re.compile(r"dropout|bernoulli|philox|distribution|curand|rand", re.I)
OPTIMIZER = re.compile(r"optimizer|adam|kPreconditionOptimizer|multi_tensor|clip|foreach", re.I)
LIGER = re.compile(r"liger|rms_norm|swiglu|rope|silu_mul|_triton", re.I)
INDUCTOR = re.compile(r"^triton_(poi|red|per|tem|for)_")  # inductor's generated kernels (their names list the fused ops)
LOSS = re.compile(r"cross_entropy|nll_loss|log_softmax|element_mul_kernel", re.I)
COPY = re.compile(r"copy|memcpy|memset|cast|convert|CatArray|cat_", re.I)
COPY_OPS = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty_like"}
ADD_OPS = {"aten::add", "aten::add_", "aten::sum"}
MUL_OPS = {"aten::mul", "aten::mul_", "aten::div", "aten::div_"}

ORDER = ["base matmul", "LoRA matmul", "lm head + loss", "attention", "bnb dequantize", "dropout / RNG", "Liger (Triton)", "compiled (inductor)",
         "optimizer", "copies / casts", "add", "mul / scale", "other elementwise"]


def load_trace(path: str | Path) -> dict:
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt") as f:
        return json.load(f)


def _dims(op: dict | None) -> list[int]:
    if not op:
        return []
    out: list[int] = []
    for d in op.get("args", {}).get("Input Dims", []) or []:
        if isinstance(d, list) and d and all(isinstance(x, int) for x in d):
            out.extend(d)
    return out


def categorize(kernel: str, op: dict | None, *, max_rank: int, vocab_min: int = 30000) -> str:
    """One category from ORDER for a kernel name and the CPU op (chrome-trace event) that launched it."""
    op_name = op.get("name", "") if op else ""
    if INDUCTOR.match(kernel):  # before the name tests below: "..._to_copy_add_mean_mul..." is one fused kernel, not a copy
        return "compiled (inductor)"
    if DEQUANT.search(kernel):
        return "bnb dequantize"
    if ATTENTION.search(kernel) or ATTENTION.search(op_name):
        return "attention"
    if LOSS.search(kernel) or "cross_entropy" in op_name.lower():
        return "lm head + loss"
    if MATMUL.search(kernel) and not LIGER.search(kernel):
        dims = [d for d in _dims(op) if d > 1]
        if any(d >= vocab_min for d in dims):
            return "lm head + loss"
        if dims and min(dims) <= 3 * max_rank:
            return "LoRA matmul"
        return "base matmul"
    if OPTIMIZER.search(kernel) or "optimizer" in op_name.lower() or "clip_grad" in op_name:
        return "optimizer"
    if LIGER.search(kernel):
        return "Liger (Triton)"
    if DROPOUT.search(kernel) or op_name in ("aten::native_dropout", "aten::dropout", "aten::bernoulli_", "aten::rand", "aten::uniform_"):
        return "dropout / RNG"
    if COPY.search(kernel) or op_name in COPY_OPS:
        return "copies / casts"
    if op_name in ADD_OPS:
        return "add"
    if op_name in MUL_OPS:
        return "mul / scale"
    return "other elementwise"


SYNC_CALLS = re.compile(r"^(cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cudaMemcpy|cudaMemcpy2D|"
                        r"cuStreamSynchronize|cuCtxSynchronize|cuEventSynchronize|cuMemcpyDtoH.*|cudaFree|cuMemFree.*)$")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def _enclosing(events: list[dict], queries: list[tuple[float, int, int]]) -> dict[int, tuple[str, str]]:
    """For each query (time, thread, key): the innermost enclosing CPU event's name and the innermost one not
    named aten::* (the Python-level context: an autograd Function's backward, a record_function range)."""
    by_tid: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        by_tid[e.get("tid")].append(e)
    qs_by_tid: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for t, tid, key in queries:
        qs_by_tid[tid].append((t, key))
    out: dict[int, tuple[str, str]] = {}
    for tid, qs in qs_by_tid.items():
        evs = sorted(by_tid.get(tid, []), key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        stack: list[tuple[float, str]] = []  # (end, name), properly nested
        i = 0
        for t, key in sorted(qs):
            while i < len(evs) and float(evs[i]["ts"]) <= t:
                e = evs[i]
                end = float(e["ts"]) + float(e.get("dur", 0))
                while stack and stack[-1][0] < float(e["ts"]):
                    stack.pop()
                stack.append((end, e.get("name", "")))
                i += 1
            while stack and stack[-1][0] < t:
                stack.pop()
            inner = stack[-1][1] if stack else "?"
            ctx = next((n for _, n in reversed(stack) if not n.startswith("aten::") and n != STEP_ANNOTATION), "?")
            out[key] = (inner, ctx)
    return out


def host_stalls(events: list[dict], kernels_in_window: list[dict], w0: float, w1: float, *, top: int = 10) -> dict:
    """Long idle gaps split into host-bound ones (the next kernel's launch call ended after the GPU went idle)
    and the rest, the ops behind the host-bound ones, and the synchronizing runtime calls in [w0, w1]."""
    launches = {}
    syncs: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in LAUNCH_CATS:
            continue
        corr = e.get("args", {}).get("correlation")
        if corr is not None:
            launches[corr] = e
        ts = float(e["ts"])
        if w0 <= ts <= w1 and SYNC_CALLS.match(e.get("name", "")):
            slot = syncs[e["name"]]
            slot[0] += 1
            slot[1] += float(e.get("dur", 0))
    ks = sorted(kernels_in_window, key=lambda k: float(k["ts"]))
    host_bound = other = 0.0
    stalls = []  # (gap, launch event)
    end = w0
    for k in ks:
        a = float(k["ts"])
        gap = a - end
        if gap >= SMALL_GAP_US:
            launch = launches.get(k.get("args", {}).get("correlation"))
            if launch is not None and float(launch["ts"]) + float(launch.get("dur", 0)) > end:
                host_bound += gap
                stalls.append((gap, launch))
            else:
                other += gap
        end = max(end, a + float(k.get("dur", 0)))
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    names = _enclosing(cpu, [(float(l["ts"]), l.get("tid"), i) for i, (_, l) in enumerate(stalls)])
    by_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for i, (gap, _) in enumerate(stalls):
        slot = by_op[names.get(i, ("?", "?"))]
        slot[0] += gap
        slot[1] += 1
    return {
        "host_bound_gaps_ms": round(host_bound / 1e3, 3),  # the GPU waited for the host to launch work
        "other_long_gaps_ms": round(other / 1e3, 3),  # work was queued but not running: syncs, events, allocator
        "syncs": {n: {"count": int(c), "ms": round(t / 1e3, 3)} for n, (c, t) in sorted(syncs.items(), key=lambda kv: -kv[1][1])},
        "stall_ops": [{"op": o, "context": c, "ms": round(t / 1e3, 3), "count": int(n)}
                      for (o, c), (t, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def breakdown(trace: dict, *, max_rank: int = 16, top: int = 15) -> dict:
    """Kernel time per category within the annotated step, idle time, and the top kernels (times in ms)."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    steps = [e for e in events if e.get("name") == STEP_ANNOTATION and e.get("ph") == "X"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        raise ValueError("the trace holds no GPU kernels; profile with ProfilerActivity.CUDA on a CUDA device")
    if steps:
        w0 = min(float(e["ts"]) for e in steps)
        w1 = max(float(e["ts"]) + float(e["dur"]) for e in steps)
    else:  # no annotation: the span of the kernels
        w0 = min(float(k["ts"]) for k in kernels)
        w1 = max(float(k["ts"]) + float(k["dur"]) for k in kernels)
    ops = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            ext = e.get("args", {}).get("External id")
            if ext is not None:
                ops[ext] = e  # a kernel's External id is the op on top of the stack when it was launched

    by_cat: dict[str, float] = defaultdict(float)
    by_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    in_window = []
    for k in kernels:
        a, b = max(float(k["ts"]), w0), min(float(k["ts"]) + float(k["dur"]), w1)
        if b <= a:
            continue
        op = ops.get(k.get("args", {}).get("External id"))
        name = k.get("name", "")
        cat = "copies / casts" if k.get("cat") != "kernel" else categorize(name, op, max_rank=max_rank)
        by_cat[cat] += b - a
        slot = by_kernel[(name[:90], cat)]
        slot[0] += b - a
        slot[1] += 1
        intervals.append((a, b))
        in_window.append(k)
    intervals.sort()
    busy = 0.0
    gaps: list[float] = []
    cur_a, cur_b = intervals[0]
    if cur_a > w0:
        gaps.append(cur_a - w0)
    for a, b in intervals[1:]:
        if a > cur_b:
            busy += cur_b - cur_a
            gaps.append(a - cur_b)
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    busy += cur_b - cur_a
    if w1 > cur_b:
        gaps.append(w1 - cur_b)
    window = w1 - w0
    kernel_sum = sum(by_cat.values())
    cats = {c: {"ms": round(by_cat[c] / 1e3, 3), "share_of_kernel_time": round(by_cat[c] / kernel_sum, 4),
                "share_of_step": round(by_cat[c] / window, 4)} for c in ORDER if by_cat.get(c)}
    small = [g for g in gaps if g < SMALL_GAP_US]
    return {
        "step_ms": round(window / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "idle_ms": round((window - busy) / 1e3, 3),
        "idle_share": round((window - busy) / window, 4),
        "idle_small_gaps_ms": round(sum(small) / 1e3, 3),  # launch latency between back-to-back kernels
        "idle_large_gaps_ms": round((sum(gaps) - sum(small)) / 1e3, 3),  # host work, syncs, allocator
        "gaps": len(gaps),
        "kernels": len(intervals),
        "overlap_ms": round((kernel_sum - busy) / 1e3, 3),  # kernels running concurrently (side streams)
        "categories": cats,
        "top_kernels": [{"name": n, "category": c, "ms": round(t / 1e3, 3), "count": cnt}
                        for (n, c), (t, cnt) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]],
        "host": host_stalls(events, in_window, w0, w1),
    }


def markdown(results: dict[str, dict]) -> str:
    """One table: a row per category, a column per run (share of the step's wall time, ms)."""
    results = {n: r for n, r in results.items() if "error" not in r}
    if not results:
        return "(no readable profile)"
    names = list(results)
    lines = ["| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in ORDER:
        if not any(c in r["categories"] for r in results.values()):
            continue
        cells = []
        for n in names:
            v = results[n]["categories"].get(c)
            cells.append(f"{100 * v['share_of_step']:.1f}% ({v['ms']:.0f} ms)" if v else "-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| idle (launch gaps < 20 µs / longer) | " + " | ".join(
        f"{100 * r['idle_share']:.1f}% ({r['idle_small_gaps_ms']:.0f} / {r['idle_large_gaps_ms']:.0f} ms)" for r in results.values()) + " |")
    lines.append("| long gaps: host-bound / other | " + " | ".join(
        f"{r['host']['host_bound_gaps_ms']:.0f} / {r['host']['other_long_gaps_ms']:.0f} ms" if "host" in r else "-" for r in results.values()) + " |")
    lines.append("| host syncs in the step | " + " | ".join(
        (", ".join(f"{n} ×{v['count']}" for n, v in r["host"]["syncs"].items()) or "none") if "host" in r else "-"
        for r in results.values()) + " |")
    lines.append("| step wall time | " + " | ".join(f"{r['step_ms']:.0f} ms, {r['kernels']} kernels" for r in results.values()) + " |")
    return "\n".join(lines)


def step_profiler(at: int, trace_path: Path, max_rank: int = 16):
    """A Trainer callback that profiles optimizer step `at` (0-based) under a `qlora_step` annotation, writes
    the chrome trace to `trace_path` and keeps its breakdown in `.result`."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.prof = self.annotation = None
            self.result: dict | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step != at or self.prof is not None:
                return
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                               record_shapes=True)
            self.prof.__enter__()
            self.annotation = torch.profiler.record_function(STEP_ANNOTATION)
            self.annotation.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.annotation is None:
                return
            torch.cuda.synchronize()
            self.annotation.__exit__(None, None, None)
            self.annotation = None
            self.prof.__exit__(None, None, None)
            Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(trace_path))
            try:
                self.result = breakdown(load_trace(trace_path), max_rank=max_rank)
            except Exception as e:  # a trace we cannot read must not fail the timed run it followed
                self.result = {"error": f"{type(e).__name__}: {e}", "trace": str(trace_path), "categories": {}}

    return StepProfiler()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="+", help="chrome trace JSON(s) with a qlora_step annotation")
    ap.add_argument("--lora-max-rank", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    results = {Path(t).name.split(".")[0]: breakdown(load_trace(t), max_rank=a.lora_max_rank) for t in a.trace}
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
