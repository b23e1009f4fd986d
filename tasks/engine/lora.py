"""The fused LoRA path (`training.engine: fused`): PEFT's LoRA layers, run with fewer and cheaper kernels.

PEFT computes each adapted projection as

    result = base(x).clone();  result = result + lora_B(lora_A(dropout(x))) * scaling

which on a 4-bit model costs, per projection: a copy of the base output (the "defensive clone"), a dropout
kernel that stores its output for the backward pass, two small matmuls, a scale kernel and a full-size add
(the profile in docs/PERF_NOTES.md: the add alone is 6.5% of a step, the scales 3.6%, dropout 4%). Here:

* projections that read the same input (q/k/v of attention, gate/up of the MLP) share one LoRA-A matmul over
  the concatenated A matrices (`LoraGroup`), computed when the first of them runs and sliced by the others;
* LoRA-B goes into the base output in place, scale included: `result.addmm_(xa, B^T, alpha=scaling)` (one
  GEMM with beta=1, no clone, no scale kernel, no add);
* dropout keeps no mask and no dropped copy of the input: the forward draws a seed, the backward regenerates
  the same Bernoulli mask from it (`seeded_dropout`: one Triton pass on CUDA, one Philox call per 8 elements;
  torch's seeded generator elsewhere). The seed comes from torch's CPU generator, whose state
  gradient checkpointing saves and restores, so a recomputed forward draws the same seed and mask (no host
  sync: a CPU tensor's `.item()`). With dropout 0 (or in eval) no seed is drawn and no dropout kernel runs.
  `fuse_lora(model, dropout="stored")` keeps torch's dropout and its mask instead (the bench's comparison).

Dropout semantics: each adapter sees `x * mask / (1 - p)` with mask ~ Bernoulli(1 - p) per element, exactly
as PEFT's `nn.Dropout`. The difference: adapters of one group share one mask (one draw per shared input, not
one per projection). The expectation and each adapter's marginal distribution are PEFT's; only the masks of
q/k/v (and of gate/up) are correlated. With `lora.dropout: 0` the fused path computes PEFT's function exactly
(tests/test_fused_lora.py: forward and gradients equal on a tiny model, per-step loss parity with the seed
engine). The weights stay PEFT's parameters under PEFT's names: `save_pretrained` writes a normal adapter.

Layers the fused path does not handle (DoRA and other variants, several active adapters, merged or disabled
adapters, mixed-adapter batches) run PEFT's own forward unchanged.
"""

from __future__ import annotations

import types
import warnings

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings that read the same input
SEED_RANGE = 2**62
STORED = -1  # LoraA's seed for the `dropout="stored"` variant (torch's dropout, mask kept)
DROPOUT_MODES = ("seeded", "stored")


# --------------------------------------------------------------------------------------------------------
# Dropout from a seed
# --------------------------------------------------------------------------------------------------------


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Boolean keep-mask, P(keep) = 1 - p: the same tensor for the same (shape, p, seed, device) every time
    (the reference path: CPU, or CUDA without Triton)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) >= p


def draw_seed() -> int:
    """A dropout seed from torch's CPU generator (checkpointing restores its state before a recompute). A CPU
    tensor: `.item()` here does not wait for the GPU, and the seed reaches the kernel as an argument (no copy)."""
    return int(torch.randint(SEED_RANGE, (1,)).item())


PHILOX_WORDS = 8  # elements per Philox-4x32 call: four 32-bit outputs, each split into two 16-bit uniforms
SUB = 1024  # elements per sub-block (8 per thread at 4 warps: 16-byte loads); a program handles PHILOX_WORDS of them


def keep_threshold(p: float) -> int:
    """The Triton kernel drops an element when its 16-bit uniform is below this: P(drop) = threshold / 65,536."""
    return min(65535, max(0, round(p * 65536)))


def _triton_dropout():
    """A one-pass seeded dropout kernel: reads t, writes t * keep / (1 - p') (in place or not), stores no mask.
    One Philox-4x32-10 call serves 8 elements (16-bit uniforms, p' = round(65,536 p) / 65,536): the first
    version drew one Philox per element and was bound by that arithmetic (1.2 TB/s on an H200, 2.6x torch's
    dropout; docs/PERF_NOTES.md row 16). Element k * SUB + i of block b reads 16-bit half k of Philox
    counter b * SUB + i, so every load and store stays contiguous. None without Triton."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no driver
        return None

    @triton.jit
    def _lora_seeded_dropout_kernel(t_ptr, out_ptr, n, threshold, scale, seed, SUB: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, SUB)
        r0, r1, r2, r3 = tl.randint4x(seed, (pid * SUB + i).to(tl.int32))
        for k in tl.static_range(8):
            if k // 2 == 0:
                r = r0
            elif k // 2 == 1:
                r = r1
            elif k // 2 == 2:
                r = r2
            else:
                r = r3
            u = (r >> (16 * (k % 2))) & 0xFFFF
            offs = pid * (8 * SUB) + k * SUB + i
            inside = offs < n
            t = tl.load(t_ptr + offs, mask=inside, other=0.0)
            y = tl.where(u.to(tl.int32) >= threshold, t.to(tl.float32) * scale, 0.0)
            tl.store(out_ptr + offs, y.to(t.dtype), mask=inside)

    def run(t: torch.Tensor, p: float, seed: int, inplace: bool = False) -> torch.Tensor:
        t = t.contiguous()
        out = t if inplace else torch.empty_like(t)
        n = t.numel()
        thr = keep_threshold(p)
        _lora_seeded_dropout_kernel[(triton.cdiv(n, PHILOX_WORDS * SUB),)](t, out, n, thr, 65536.0 / (65536 - thr), seed,
                                                                          SUB=SUB, num_warps=4)
        return out

    return run


_TRITON_DROPOUT = None
_TRITON_CHECKED = False


def seeded_dropout(t: torch.Tensor, p: float, seed: int, inplace: bool = False) -> torch.Tensor:
    """t * keep / (1 - p) with a keep-mask that depends only on (t's shape, p, seed, device): calling it on the
    input in the forward and on the gradient in the backward applies the same mask, which is never stored.
    `inplace` overwrites t (for a fresh temporary, e.g. the backward's `g @ A`: no second buffer of its size)."""
    global _TRITON_DROPOUT, _TRITON_CHECKED
    if p <= 0:
        return t
    if t.is_cuda and t.numel() < 2**31:
        if not _TRITON_CHECKED:
            _TRITON_DROPOUT, _TRITON_CHECKED = _triton_dropout(), True
        if _TRITON_DROPOUT is not None:
            try:
                return _TRITON_DROPOUT(t, p, seed % 2**31, inplace and t.is_contiguous())
            except Exception as e:  # a Triton that cannot compile here: the torch path has the same contract
                warnings.warn(f"fused LoRA: Triton dropout failed ({type(e).__name__}: {e}); using torch's seeded generator")
                _TRITON_DROPOUT = None
    keep = dropout_mask(t.shape, p, seed, t.device).to(t.dtype)
    if inplace:
        return t.mul_(keep).mul_(1.0 / (1.0 - p))
    return t * keep * (1.0 / (1.0 - p))


def dropout_backend(device_type: str = "cuda") -> str:
    """Which seeded-dropout path runs on `device_type`: "triton" or "torch"."""
    global _TRITON_DROPOUT, _TRITON_CHECKED
    if device_type != "cuda":
        return "torch"
    if not _TRITON_CHECKED:
        _TRITON_DROPOUT, _TRITON_CHECKED = _triton_dropout(), True
    return "triton" if _TRITON_DROPOUT is not None else "torch"


# --------------------------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------------------------


class LoraA(torch.autograd.Function):
    """xa = dropout(x) @ A^T with A the (concatenated) LoRA-A weights; saves x and a seed, never the mask.

    seed = STORED (-1) is the comparison variant `dropout="stored"`: torch's own dropout, keeping the dropped
    input and the mask for backward as PEFT does (the CUDA generator's state is what checkpointing restores)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, p: float, seed: int, dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            if seed == STORED and p > 0:
                xd, keep = torch.native_dropout(x2.to(dtype), p, True)
                xa = xd @ a.to(dtype).t()
                ctx.save_for_backward(x, a, xd, keep)
            else:
                xa = seeded_dropout(x2.to(dtype), p, seed) @ a.to(dtype).t()
                ctx.save_for_backward(x, a)
        ctx.p, ctx.seed, ctx.dtype = p, seed, dtype
        return xa.view(*x.shape[:-1], a.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, seed, dtype = ctx.p, ctx.seed, ctx.dtype
        stored = seed == STORED and p > 0
        if stored:
            x, a, xd, keep = ctx.saved_tensors
        else:
            x, a = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(dtype)
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:
            if not stored:
                xd = seeded_dropout(x.reshape(-1, x.shape[-1]).to(dtype), p, seed)
            grad_a = (g2.t() @ xd).to(a.dtype)
        if ctx.needs_input_grad[0]:
            gx = g2 @ a.to(dtype)
            if stored:
                gx = torch.ops.aten.native_dropout_backward(gx, keep, 1.0 / (1.0 - p))
            else:
                gx = seeded_dropout(gx, p, seed, inplace=True)  # gx is a fresh temporary
            grad_x = gx.view(x.shape).to(x.dtype)
        return grad_x, grad_a, None, None, None


class LoraBInPlace(torch.autograd.Function):
    """result += scaling * xa @ B^T, in place in the base output (one GEMM with beta=1)."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scaling: float):
        out = result.view(-1, result.shape[-1])
        with torch.autocast(device_type=result.device.type, enabled=False):
            out.addmm_(xa.reshape(-1, xa.shape[-1]).to(result.dtype), b.to(result.dtype).t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(xa, b)
        ctx.scaling = scaling
        return result

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xa, b = ctx.saved_tensors
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1])
        dtype = g2.dtype
        grad_xa = grad_b = None
        # The scale rides in the GEMMs' alpha (beta 0: the empty input is never read): no separate mul_ kernel.
        if ctx.needs_input_grad[1]:
            grad_xa = torch.addmm(g2.new_empty(()), g2, b.to(dtype), beta=0, alpha=s).view(xa.shape).to(xa.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.addmm(g2.new_empty(()), g2.t(), xa.reshape(-1, xa.shape[-1]).to(dtype), beta=0, alpha=s).to(b.dtype)
        return g, grad_xa, grad_b, None


# --------------------------------------------------------------------------------------------------------
# Groups of projections with a shared input
# --------------------------------------------------------------------------------------------------------


class LoraGroup:
    """Projections that read the same input: one LoRA-A matmul for all of them, sliced per member.

    The first member called with a tensor computes `dropout(x) @ cat(A_i)^T` and keeps it until every member
    has taken its slice (then forgets it: nothing outlives the layer's forward). A member called with another
    tensor (a model that does not feed them the same input) computes its own A-matmul.
    """

    def __init__(self, layers: list, dropout: str = "seeded"):
        self.layers = layers
        self.dropout = dropout
        self.x = None
        self.xa = None
        self.taken: set[int] = set()

    def xa_for(self, layer, x: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
        i = self.layers.index(layer)
        if self.x is not x or i in self.taken:
            a = torch.cat([lay.lora_A[lay.active_adapters[0]].weight for lay in self.layers]) if len(self.layers) > 1 \
                else layer.lora_A[layer.active_adapters[0]].weight
            self.x, self.taken = x, set()
            seed = 0 if p <= 0 else STORED if self.dropout == "stored" else draw_seed()  # p = 0: no dropout at all
            self.xa = LoraA.apply(x, a, p, seed, dtype)
        self.taken.add(i)
        lo = sum(lay.lora_A[lay.active_adapters[0]].weight.shape[0] for lay in self.layers[:i])
        r = layer.lora_A[layer.active_adapters[0]].weight.shape[0]
        xa = self.xa if len(self.layers) == 1 else self.xa[..., lo:lo + r]
        if len(self.taken) == len(self.layers):
            self.x = self.xa = None
        return xa


def _fusable(layer) -> bool:
    """A vanilla single-adapter LoRA layer in its normal state."""
    names = list(layer.active_adapters)
    if len(names) != 1 or names[0] not in layer.lora_A or layer.disable_adapters or layer.merged:
        return False
    return names[0] not in getattr(layer, "lora_variant", {}) and not getattr(layer, "use_dora", {}).get(names[0], False)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if kwargs.get("adapter_names") is not None or not _fusable(self) or torch.compiler.is_compiling():
        # Inside a compiled layer (training.compile, tasks/engine/compile.py) PEFT's forward: the compiler fuses its
        # clone, scale, add and dropout itself, where this path's host-side seed and group cache would break the graph.
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    result = self.base_layer(x, *args, **kwargs)
    if result._base is not None:  # a view (bitsandbytes' inference kernels return one): PEFT's clone, only then
        result = result.clone()
    # The LoRA matmuls run in autocast's dtype when autocast is on (as PEFT's nn.Linear calls would), else in the
    # base output's: bitsandbytes casts its output back to the input's dtype, fp32 after k-bit prep.
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else result.dtype
    xa = self._lora_group.xa_for(self, x, p, dtype)
    return LoraBInPlace.apply(result, xa, self.lora_B[name].weight, float(self.scaling[name]))


def fuse_lora(model, dropout: str = "seeded") -> int:
    """Switch every PEFT LoRA linear of `model` to the fused forward; returns how many layers were switched.

    Siblings named in GROUPS with the same input width and dropout share one A-matmul. The parameters are not
    touched (same tensors, same names), so optimizers, checkpoints and `save_pretrained` see PEFT's model.
    `dropout`: "seeded" (the engine's: mask regenerated from a seed, nothing kept) or "stored" (torch's dropout,
    dropped input + mask kept for backward as PEFT does; for bench/gpu_bench.py's comparison).
    """
    from peft.tuners.lora import LoraLayer

    if dropout not in DROPOUT_MODES:
        raise ValueError(f"fuse_lora: dropout={dropout!r} is not one of {DROPOUT_MODES}")
    n = 0
    for parent in model.modules():
        children = {k: m for k, m in parent.named_children() if isinstance(m, LoraLayer) and isinstance(m, torch.nn.Module)
                    and hasattr(m, "lora_A") and _is_linear(m)}
        if not children:
            continue
        grouped: set[str] = set()
        for names in GROUPS:
            members = [children[k] for k in names if k in children and _fusable(children[k])]
            members = [m for m in members if _same_input(m, members[0])]
            if len(members) > 1:
                group = LoraGroup(members, dropout)
                for m in members:
                    _install(m, group)
                grouped |= {k for k in names if k in children and children[k] in members}
        for k, m in children.items():
            if k not in grouped:
                _install(m, LoraGroup([m], dropout))
        n += len(children)
    return n


def _is_linear(layer) -> bool:
    base = layer.get_base_layer()
    return isinstance(base, torch.nn.Linear) or type(base).__name__ in ("Linear4bit", "Linear8bitLt")


def _same_input(a, b) -> bool:
    na, nb = a.active_adapters[0], b.active_adapters[0]
    da, db = a.lora_dropout[na], b.lora_dropout[nb]
    pa = da.p if isinstance(da, torch.nn.Dropout) else 0.0
    pb = db.p if isinstance(db, torch.nn.Dropout) else 0.0
    return a.in_features == b.in_features and pa == pb


def _install(layer, group: LoraGroup) -> None:
    if not hasattr(layer, "_peft_forward"):
        layer._peft_forward = layer.forward
    layer._lora_group = group
    layer.forward = types.MethodType(_fused_forward, layer)


def unfuse_lora(model) -> None:
    """Back to PEFT's own forward on every layer `fuse_lora` switched."""
    for m in model.modules():
        if hasattr(m, "_peft_forward"):
            m.forward = m._peft_forward
            del m._peft_forward, m._lora_group
