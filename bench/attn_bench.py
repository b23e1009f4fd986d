"""Issue 19: attention alone, rows against the packed row, at Mistral-7B's shapes (32 q heads, 8 kv heads, head dim 128).

The own loop runs 11,264 tokens/s on (4, 2048) rows through transformers' SDPA and 10,579 (0.939x) on the same four
samples packed into one (1, 8192) row through the project's varlen attention (docs/PERF_NOTES.md, "The split
finished"). Two candidate causes, both measured here on the SAME tokens, forward + backward, bf16, causal:
the kernel (SDPA on an H200 may pick cuDNN's Hopper attention for the rows; the packed row runs torch's varlen flash
kernel) or the wrapper's per-layer copies (`_repeat_kv` when the kernel lacks GQA, `.contiguous()` after a transpose).

Variants (every one in its own try: an unavailable backend is a recorded error, not a crash):

    rows/sdpa-*            transformers' sdpa_attention_forward on (4, 32, 2048, 128) q, (4, 8, 2048, 128) k/v, as
                           MistralAttention calls it; torch's default backend choice, then each backend forced
    rows/sdpa-repeated-*   F.scaled_dot_product_attention on the rows with k/v repeated to 32 heads beforehand
                           (default, cuDNN, flash): what cuDNN does on the rows if GQA is what keeps it out
    {equal,mixed}/varlen-wrapper      tasks/engine/fastpath.py varlen_attention_forward on the (1, 32, 8192, 128) row
    {equal,mixed}/varlen-kernel-*     torch.nn.attention.varlen.varlen_attn alone: GQA native (if the kernel has it),
                                      or k/v repeated and contiguous before the clock starts (with/without the window)
    {equal,mixed}/cudnn-op-*          torch.ops.aten._cudnn_attention_forward with cum_seq_q/cum_seq_k (the varlen
                                      cuDNN op; autograd through its own derivative)
    {equal,mixed}/varlen-attn-cudnn   varlen_attn with torch's `_should_use_cudnn` switched on (its cuDNN routing)
    {equal,mixed}/njt-sdpa-*          nested jagged tensors through F.scaled_dot_product_attention, default and forced
    {equal,mixed}/sdpa-per-sample     one SDPA call per sample (the reference for the mixed pack)

`equal` is cu_seq_lens [0, 2048, 4096, 6144, 8192] (the rows' tokens, the reference is rows/sdpa-default); `mixed` is 8
seeded random lengths summing to 8192 (reference: sdpa-per-sample). Every variant's output and q/k/v gradients are
compared with its reference (max abs diff, and that over the reference's max abs). Timings: CUDA events, median of
--iters after --warmup, forward alone and forward + backward (`torch.autograd.grad`, no accumulation).

    PYTHONPATH=$PWD python3 bench/attn_bench.py --out $OUT                       # one H200: ~30 s
    PYTHONPATH=$PWD python3 bench/attn_bench.py --device cpu --small --out /tmp/attn   # CPU smoke (tests/test_attn_bench.py)

Writes attn_bench.json (environment, default-backend choice, one record per variant) and attn_bench.md (the table).
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROW_BACKENDS = ("default", "cudnn", "flash", "efficient", "math")
ROW_REPEATED = ("default", "cudnn", "flash")
PACK_VARIANTS = ("varlen-wrapper", "varlen-kernel-gqa", "varlen-kernel-repeated", "varlen-kernel-repeated-nowindow",
                 "cudnn-op-gqa", "cudnn-op-repeated", "varlen-attn-cudnn",
                 "njt-sdpa-default", "njt-sdpa-cudnn", "njt-sdpa-flash", "njt-sdpa-efficient", "sdpa-per-sample")
VARIANTS = ([f"rows/sdpa-{b}" for b in ROW_BACKENDS] + [f"rows/sdpa-repeated-{b}" for b in ROW_REPEATED]
            + [f"{pack}/{v}" for pack in ("equal", "mixed") for v in PACK_VARIANTS])
"""Every record attn_bench.json holds, in table order (the test checks each has a time or an error)."""
REFERENCES = {"rows": "rows/sdpa-default", "equal": "rows/sdpa-default", "mixed": "mixed/sdpa-per-sample"}
"""What each pack's variants are compared with: the rows hold the equal pack's tokens in the same order."""


@dataclass(frozen=True)
class Shape:
    batch: int = 4
    """Rows of the padded layout; the packed row holds batch x length tokens."""
    length: int = 2048
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    segments: int = 8
    """Samples in the mixed pack (seeded random lengths summing to batch x length)."""
    sliding_window: int | None = 4096
    """Mistral-7B-v0.1's config value, which MistralAttention hands every attention call."""

    @property
    def tokens(self) -> int:
        return self.batch * self.length


SMALL = Shape(batch=2, length=32, heads=4, kv_heads=2, head_dim=16, segments=4, sliding_window=64)


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def forced(name: str):
    """sdpa_kernel(<backend>) for a forced variant, nothing for the default."""
    if name == "default":
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_backend(name))


@contextmanager
def cudnn_varlen_routing():
    """torch's varlen_attn with its cuDNN branch switched on. `_should_use_cudnn` decides it: `return False` in torch
    2.13 (the CPU venv) and in some pytorch revisions, `capability >= 10` or cuDNN >= 9.18 on sm 9/10 in others, so
    the device's own answer is recorded in attn_bench.json's env; the branch calls aten._cudnn_attention_forward."""
    import torch.nn.attention.varlen as varlen

    if not hasattr(varlen, "_should_use_cudnn"):
        raise RuntimeError("this torch's torch.nn.attention.varlen has no _should_use_cudnn switch")
    saved = varlen._should_use_cudnn
    varlen._should_use_cudnn = lambda device_index: True
    try:
        yield
    finally:
        varlen._should_use_cudnn = saved


def attention_module(shape: Shape) -> torch.nn.Module:
    """The attributes transformers' sdpa_attention_forward and the varlen wrapper read off MistralAttention."""
    m = torch.nn.Module()
    m.num_key_value_groups = shape.heads // shape.kv_heads
    m.is_causal = True
    m.head_dim = shape.head_dim
    m.scaling = shape.head_dim ** -0.5
    return m.train()


def mixed_cu(shape: Shape, seed: int) -> list[int]:
    cuts = sorted(random.Random(seed).sample(range(1, shape.tokens), shape.segments - 1))
    return [0, *cuts, shape.tokens]


def repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(T, Hkv, D) -> (T, Hkv * n_rep, D), each kv head next to its query group (repeat_kv's order)."""
    return x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x


def fold_heads(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Gradient of repeated heads back to the kv heads they were copied from."""
    t, h, d = g.shape
    return g.view(t, kv_heads, h // kv_heads, d).sum(2) if h != kv_heads else g


# ------------------------------------------------------------------------------------------------ variants
# Each builder returns run(), which does one forward and hands back (out (T, H, D), leaves its gradients go to);
# the token-major leaves are q (T, H, D), k/v (T, Hkv, D) or their repeated copies (T, H, D).


class Inputs:
    def __init__(self, shape: Shape, device: str, dtype: torch.dtype, seed: int):
        g = torch.Generator(device="cpu").manual_seed(seed)
        n, h, kv, d = shape.tokens, shape.heads, shape.kv_heads, shape.head_dim
        make = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        self.shape, self.n_rep = shape, h // kv
        self.q = make(n, h, d).requires_grad_()
        self.k = make(n, kv, d).requires_grad_()
        self.v = make(n, kv, d).requires_grad_()
        self.k_rep = repeat_heads(self.k.detach(), self.n_rep).contiguous().requires_grad_()
        self.v_rep = repeat_heads(self.v.detach(), self.n_rep).contiguous().requires_grad_()
        self.grad_out = make(n, h, d)
        self.module = attention_module(shape)
        self.scale = shape.head_dim ** -0.5

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) views over token-major memory: the layout q_proj(x).view(B, T, H, D).transpose(1, 2) has."""
        b, t = self.shape.batch, self.shape.length
        return x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2)

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(1, x.shape[0], x.shape[1], x.shape[2]).transpose(1, 2)


def sdpa_rows(inp: Inputs, backend: str) -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    s = inp.shape
    position_ids = torch.arange(s.length, device=inp.q.device).expand(s.batch, s.length)

    def run():
        with forced(backend):
            out, _ = sdpa_attention_forward(inp.module, inp.rows(inp.q), inp.rows(inp.k), inp.rows(inp.v), None,
                                            dropout=0.0, scaling=inp.scale, sliding_window=s.sliding_window,
                                            position_ids=position_ids)
        return out.reshape(s.tokens, s.heads, s.head_dim), (inp.q, inp.k, inp.v)
    return run


def sdpa_rows_repeated(inp: Inputs, backend: str) -> Callable:
    """F.scaled_dot_product_attention itself on the rows with k/v repeated beforehand (no enable_gqa): whether a
    backend that refuses or slows on GQA (cuDNN) would win on the rows if it were handed 32 kv heads."""
    s = inp.shape

    def run():
        with forced(backend):
            out = F.scaled_dot_product_attention(inp.rows(inp.q), inp.rows(inp.k_rep), inp.rows(inp.v_rep),
                                                 is_causal=True, scale=inp.scale)
        return out.transpose(1, 2).reshape(s.tokens, s.heads, s.head_dim), (inp.q, inp.k_rep, inp.v_rep)
    return run


def varlen_wrapper(inp: Inputs, cu: list[int]) -> Callable:
    from tasks.engine.fastpath import varlen_attention_forward

    s = inp.shape
    dev = inp.q.device
    position_ids = torch.cat([torch.arange(b - a, device=dev) for a, b in zip(cu, cu[1:])])[None]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    max_len = max(b - a for a, b in zip(cu, cu[1:]))

    def run():
        # What MistralAttention hands the registered attention with the collator's batch (PaddingFreeCollator).
        out, _ = varlen_attention_forward(inp.module, inp.packed(inp.q), inp.packed(inp.k), inp.packed(inp.v), None,
                                          dropout=0.0, scaling=inp.scale, sliding_window=s.sliding_window,
                                          position_ids=position_ids, cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t,
                                          max_length_q=max_len, max_length_k=max_len)
        return out[0], (inp.q, inp.k, inp.v)

    from tasks.engine.fastpath import _VARLEN

    if not inp.q.is_cuda or _VARLEN is None:
        run.note = "the wrapper's per-sample SDPA path (no CUDA or no varlen kernel), not the varlen kernel"
    elif inp.n_rep > 1:
        run.note = "GQA native in the kernel" if _VARLEN[2] else "k/v repeated by the wrapper (kernel without GQA)"
    return run


def varlen_kernel(inp: Inputs, cu: list[int], kv: str, window: bool) -> Callable:
    from torch.nn.attention.varlen import varlen_attn

    s = inp.shape
    params = inspect.signature(varlen_attn).parameters
    cu_t = torch.tensor(cu, dtype=torch.int32, device=inp.q.device)
    max_len = max(b - a for a, b in zip(cu, cu[1:]))
    if "window_size" in params:  # the wrapper's arguments: the window (w-1, 0) where the model has one, else causal
        causal = {"window_size": (s.sliding_window - 1, 0) if window and s.sliding_window else (-1, 0)}
    else:
        causal = {"is_causal": True}
    gqa = {}
    if kv == "gqa" and inp.n_rep > 1:
        if "enable_gqa" not in params:
            raise RuntimeError("this torch's varlen_attn has no enable_gqa: the wrapper repeats k/v (see -repeated)")
        gqa = {"enable_gqa": True}
    k, v = (inp.k, inp.v) if kv == "gqa" else (inp.k_rep, inp.v_rep)

    def run():
        out = varlen_attn(inp.q, k, v, cu_t, cu_t, max_len, max_len, scale=inp.scale, **causal, **gqa)
        return out, (inp.q, k, v)
    return run


def cudnn_op(inp: Inputs, cu: list[int], kv: str) -> Callable:
    cu_t = torch.tensor(cu, dtype=torch.int32, device=inp.q.device)
    max_len = max(b - a for a, b in zip(cu, cu[1:]))
    k, v = (inp.k, inp.v) if kv == "gqa" else (inp.k_rep, inp.v_rep)

    def run():
        res = torch.ops.aten._cudnn_attention_forward(inp.q, k, v, None, cu_t, cu_t, max_len, max_len, True, 0.0, True,
                                                      False, scale=inp.scale)
        return res[0], (inp.q, k, v)
    return run


def varlen_attn_cudnn(inp: Inputs, cu: list[int]) -> Callable:
    run_kernel = varlen_kernel(inp, cu, "repeated", window=False)  # torch's cuDNN branch refuses GQA and windows

    run = lambda: run_kernel()  # noqa: E731
    run.scope = cudnn_varlen_routing  # held over forward AND backward: the custom op's backward asks again
    return run


def njt_sdpa(inp: Inputs, cu: list[int], backend: str) -> Callable:
    """Nested jagged q/k/v (N, H, j, D) through F.scaled_dot_product_attention; GQA native when the jagged path takes
    it (tried once here), else k/v repeated."""
    offsets = torch.tensor(cu, dtype=torch.int64, device=inp.q.device)
    lens = [b - a for a, b in zip(cu, cu[1:])]

    def nested(x):
        return torch.nested.nested_tensor_from_jagged(x, offsets, min_seqlen=min(lens), max_seqlen=max(lens)).transpose(1, 2)

    def call(k, v, gqa):
        with forced(backend):
            out = F.scaled_dot_product_attention(nested(inp.q), nested(k), nested(v), is_causal=True, scale=inp.scale,
                                                 **({"enable_gqa": True} if gqa else {}))
        return out.transpose(1, 2).values(), (inp.q, k, v)

    try:  # the jagged path refuses k/v with fewer heads than q whenever a gradient is wanted (torch 2.13)
        call(inp.k, inp.v, inp.n_rep > 1)
        kv, note = (inp.k, inp.v, inp.n_rep > 1), "GQA native" if inp.n_rep > 1 else ""
    except Exception as e:  # noqa: BLE001  (recorded: which kv layout the jagged path took)
        kv, note = (inp.k_rep, inp.v_rep, False), f"k/v repeated: GQA refused ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    run = lambda: call(*kv)  # noqa: E731
    run.note = note
    return run


def sdpa_per_sample(inp: Inputs, cu: list[int]) -> Callable:
    def run():
        outs = []
        for a, b in zip(cu, cu[1:]):
            q, k, v = (x[a:b].transpose(0, 1) for x in (inp.q, inp.k, inp.v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=inp.scale, enable_gqa=inp.n_rep > 1)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs), (inp.q, inp.k, inp.v)
    return run


def build(name: str, inp: Inputs, cus: dict[str, list[int]]) -> Callable:
    pack, variant = name.split("/")
    if pack == "rows" and variant.startswith("sdpa-repeated-"):
        return sdpa_rows_repeated(inp, variant.removeprefix("sdpa-repeated-"))
    if pack == "rows":
        return sdpa_rows(inp, variant.removeprefix("sdpa-"))
    cu = cus[pack]
    if variant == "varlen-wrapper":
        return varlen_wrapper(inp, cu)
    if variant.startswith("varlen-kernel-"):
        kv = "gqa" if variant == "varlen-kernel-gqa" else "repeated"
        return varlen_kernel(inp, cu, kv, window=not variant.endswith("nowindow"))
    if variant.startswith("cudnn-op-"):
        return cudnn_op(inp, cu, variant.removeprefix("cudnn-op-"))
    if variant == "varlen-attn-cudnn":
        return varlen_attn_cudnn(inp, cu)
    if variant.startswith("njt-sdpa-"):
        return njt_sdpa(inp, cu, variant.removeprefix("njt-sdpa-"))
    if variant == "sdpa-per-sample":
        return sdpa_per_sample(inp, cu)
    raise ValueError(f"unknown variant {name}")


# ------------------------------------------------------------------------------------------------ measuring


def fwd_bwd(run: Callable, grad_out: torch.Tensor):
    out, leaves = run()
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, leaves, grads


def median_ms(fn: Callable, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


OP_WORDS = ("attention", "attn", "repeat_interleave", "copy_", "clone", "cat", "fmha", "flash", "cudnn", "sdpa")


def ops_seen(run: Callable, grad_out: torch.Tensor, device: str) -> dict[str, int]:
    """The attention ops and kernels, and the copies, one forward + backward launches (torch.profiler names)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fwd_bwd(run, grad_out)
        if device == "cuda":
            torch.cuda.synchronize()
    seen = {}
    for e in prof.key_averages():
        if any(w in e.key.lower() for w in OP_WORDS):
            seen[e.key[:140]] = int(e.count)
    return dict(sorted(seen.items()))


def diffs(ref, got, kv_heads: int) -> dict[str, float]:
    """Max abs difference of output and q/k/v gradients against the reference, and that over the reference's max."""
    r_out, _, r_grads = ref
    g_out, _, g_grads = got
    res = {}
    pairs = [("out", r_out, g_out)] + [(n, rg, fold_heads(gg, kv_heads) if n != "dq" else gg)
                                        for n, rg, gg in zip(("dq", "dk", "dv"), r_grads, g_grads)]
    for n, r, g in pairs:
        d = (r.float() - g.float()).abs().max().item()
        res[n] = d
        res[f"{n}_rel"] = d / max(r.float().abs().max().item(), 1e-12)
    return res


def tolerance(dtype: torch.dtype) -> float:
    """Largest max-abs-diff / max-abs-reference that counts as agreeing (two kernels' rounding, not a bug)."""
    return 1e-4 if dtype == torch.float32 else 3e-2


def default_choice(inp: Inputs) -> dict:
    """What transformers passes to F.scaled_dot_product_attention for the rows, and which backend torch's dispatcher
    picks for exactly those arguments (torch._fused_sdp_choice, the function SDPA itself consults)."""
    from torch.nn.attention import SDPBackend

    seen: dict = {}
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        seen.update(q_shape=list(q.shape), k_shape=list(k.shape), attn_mask=attn_mask is not None, is_causal=is_causal,
                    enable_gqa=enable_gqa, q_contiguous=q.is_contiguous(), k_contiguous=k.is_contiguous())
        try:
            choice = torch._fused_sdp_choice(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
            seen["fused_sdp_choice"] = SDPBackend(choice).name
        except Exception as e:  # noqa: BLE001
            seen["fused_sdp_choice"] = f"unknown ({type(e).__name__}: {e})"
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            sdpa_rows(inp, "default")()
    finally:
        F.scaled_dot_product_attention = real
    return seen


def environment(device: str) -> dict:
    import transformers

    from tasks.engine.fastpath import _VARLEN

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "fastpath_varlen": None if _VARLEN is None else {"causal_args": _VARLEN[1], "gqa": _VARLEN[2]}}
    try:
        from torch.nn.attention.varlen import varlen_attn
        env["varlen_attn_params"] = list(inspect.signature(varlen_attn).parameters)
        import torch.nn.attention.varlen as varlen

        env["varlen_should_use_cudnn_source"] = inspect.getsource(varlen._should_use_cudnn).strip()[-400:]
        if device == "cuda":  # what varlen_attn (and so the project's wrapper) runs on this GPU without the patch
            env["varlen_should_use_cudnn"] = bool(varlen._should_use_cudnn(torch.cuda.current_device()))
    except (ImportError, AttributeError, OSError, TypeError) as e:
        env["varlen_attn_params"] = env.get("varlen_attn_params") or f"absent ({e})"
    try:
        from torch.nn.attention import _get_flash_version
        env["flash_version"] = _get_flash_version()
    except Exception:  # noqa: BLE001
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        env["sdp_enabled"] = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")()
                              for n in ("flash", "mem_efficient", "math", "cudnn")}
    return env


def measure(name: str, run: Callable, inp: Inputs, ref, args) -> dict:
    rec: dict = {"variant": name}
    got = fwd_bwd(run, inp.grad_out)
    if ref is not None:
        rec["diff"] = diffs(ref, got, inp.shape.kv_heads)
        rec["agrees"] = max(v for k, v in rec["diff"].items() if k.endswith("_rel")) <= tolerance(args.dtype)
    del got
    rec["ms_fwd"] = median_ms(lambda: run(), args.device, args.warmup, args.iters)
    rec["ms_fwd_bwd"] = median_ms(lambda: fwd_bwd(run, inp.grad_out), args.device, args.warmup, args.iters)
    rec["ops"] = ops_seen(run, inp.grad_out, args.device)
    return rec


def run_all(args) -> dict:
    shape = SMALL if args.small else Shape()
    inp = Inputs(shape, args.device, args.dtype, args.seed)
    cus = {"equal": [i * shape.length for i in range(shape.batch + 1)], "mixed": mixed_cu(shape, args.seed)}
    result = {"shape": asdict(shape), "dtype": str(args.dtype).removeprefix("torch."), "device": args.device,
              "iters": args.iters, "warmup": args.warmup, "cu_seq_lens": cus, "tolerance_rel": tolerance(args.dtype),
              "env": environment(args.device), "records": []}
    try:
        result["sdpa_default_call"] = default_choice(inp)
    except Exception as e:  # noqa: BLE001
        result["sdpa_default_call"] = {"error": f"{type(e).__name__}: {e}"}
    refs: dict = {}
    for ref_name in REFERENCES.values():  # each pack's reference once, before the variants it judges
        try:
            refs[ref_name] = fwd_bwd(build(ref_name, inp, cus), inp.grad_out)
        except Exception as e:  # noqa: BLE001
            result.setdefault("reference_errors", {})[ref_name] = f"{type(e).__name__}: {e}"
    for name in VARIANTS:
        if args.only and not any(w in name for w in args.only.split(",")):
            continue
        ref_name = REFERENCES[name.split("/")[0]]
        try:
            run = build(name, inp, cus)
            with getattr(run, "scope", nullcontext)():
                rec = measure(name, run, inp, refs.get(ref_name), args)
            if getattr(run, "note", ""):
                rec["note"] = run.note
        except Exception as e:  # noqa: BLE001  (an unavailable backend or API is a result)
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            rec = {"variant": name, "error": f"{type(e).__name__}: {msg}"}
            if args.verbose:
                traceback.print_exc()
        rec["reference"] = ref_name
        result["records"].append(rec)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(line(rec), flush=True)
    return result


def line(rec: dict) -> str:
    if "error" in rec:
        return f"{rec['variant']:40s} error: {rec['error']}"
    worst = max((v for k, v in rec.get("diff", {}).items() if k.endswith("_rel")), default=float("nan"))
    return f"{rec['variant']:40s} fwd {rec['ms_fwd']:8.3f} ms  fwd+bwd {rec['ms_fwd_bwd']:8.3f} ms  max rel diff {worst:.2e}"


def table(result: dict) -> str:
    base = next((r["ms_fwd_bwd"] for r in result["records"] if r["variant"] == "rows/sdpa-default" and "ms_fwd_bwd" in r),
                None)
    s, env = result["shape"], result["env"]
    head = (f"attention alone, {result['dtype']}, causal, {s['batch']} x {s['length']} tokens, {s['heads']} q / "
            f"{s['kv_heads']} kv heads, head dim {s['head_dim']}; torch {env['torch']}, transformers {env['transformers']}, "
            f"cuDNN {env.get('cudnn')}, {env.get('gpu', result['device'])}; median of {result['iters']}. SDPA's default "
            f"for the rows: {result.get('sdpa_default_call', {}).get('fused_sdp_choice')} "
            f"(enable_gqa={result.get('sdpa_default_call', {}).get('enable_gqa')}).\n\n")
    rows = ["| variant | fwd ms | fwd+bwd ms | vs rows/sdpa-default | max abs diff out / dq / dk / dv | attention ops | note |",
            "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if "error" in r:
            rows.append(f"| {r['variant']} | - | - | - | - | - | {r['error'][:160]} |")
            continue
        d = r.get("diff", {})
        diff = " / ".join(f"{d[k]:.1e}" for k in ("out", "dq", "dk", "dv")) if d else "-"
        if d and not r.get("agrees"):
            diff += " **disagrees**"
        ratio = f"{r['ms_fwd_bwd'] / base:.3f}" if base else "-"
        ops = ", ".join(f"{k} x{v}" for k, v in r["ops"].items()
                        if any(w in k.lower() for w in ("attention", "attn", "repeat", "fmha", "flash", "cudnn")))[:300]
        rows.append(f"| {r['variant']} | {r['ms_fwd']:.3f} | {r['ms_fwd_bwd']:.3f} | {ratio} | {diff} | {ops} | "
                    f"{r.get('note', '')} |")
    foot = ("\n\nThe mixed pack does less attention work than the rows (the sum of its samples' squared lengths): compare "
            "its variants with mixed/sdpa-per-sample, not with the rows.\n")
    return head + "\n".join(rows) + foot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="tiny shapes (2 x 32 tokens, 4/2 heads, head dim 16)")
    ap.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--iters", type=int, default=None, help="timed repeats (default 30 on cuda, 3 on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 5 on cuda, 1 on cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    ap.add_argument("--verbose", action="store_true", help="print each variant's traceback")
    ap.add_argument("--out", required=True, help="directory for attn_bench.json and attn_bench.md")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; use --device cpu --small for the smoke run")
    cuda = args.device == "cuda"
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.bfloat16 if cuda else torch.float32}[args.dtype]
    args.iters = args.iters if args.iters is not None else (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    result = run_all(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attn_bench.json").write_text(json.dumps(result, indent=1, default=str))
    md = table(result)
    (out / "attn_bench.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
