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
  the same Bernoulli mask from it (`seeded_dropout`: one Triton pass on CUDA, torch's seeded generator
  elsewhere). The seed comes from torch's CPU generator, whose state
  gradient checkpointing saves and restores, so a recomputed forward draws the same seed and mask.

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
    """A dropout seed from torch's CPU generator (checkpointing restores its state before a recompute)."""
    return int(torch.randint(SEED_RANGE, (1,)).item())


def _triton_dropout():
    """A one-pass seeded dropout kernel (Philox counter = element index): reads t, writes t * keep / (1 - p),
    stores no mask. None without Triton."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no driver
        return None

    @triton.jit
    def _lora_seeded_dropout_kernel(t_ptr, out_ptr, n, p, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        t = tl.load(t_ptr + offs, mask=inside, other=0.0)
        keep = tl.rand(seed, offs.to(tl.int32)) >= p
        y = tl.where(keep, t.to(tl.float32) / (1.0 - p), 0.0)
        tl.store(out_ptr + offs, y.to(t.dtype), mask=inside)

    def run(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        t = t.contiguous()
        out = torch.empty_like(t)
        n = t.numel()
        block = 2048
        _lora_seeded_dropout_kernel[(triton.cdiv(n, block),)](t, out, n, p, seed, BLOCK=block)
        return out

    return run


_TRITON_DROPOUT = None
_TRITON_CHECKED = False


def seeded_dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """t * keep / (1 - p) with a keep-mask that depends only on (t's shape, p, seed, device): calling it on the
    input in the forward and on the gradient in the backward applies the same mask, which is never stored."""
    global _TRITON_DROPOUT, _TRITON_CHECKED
    if p <= 0:
        return t
    if t.is_cuda and t.numel() < 2**31:
        if not _TRITON_CHECKED:
            _TRITON_DROPOUT, _TRITON_CHECKED = _triton_dropout(), True
        if _TRITON_DROPOUT is not None:
            try:
                return _TRITON_DROPOUT(t, p, seed % 2**31)
            except Exception as e:  # a Triton that cannot compile here: the torch path has the same contract
                warnings.warn(f"fused LoRA: Triton dropout failed ({type(e).__name__}: {e}); using torch's seeded generator")
                _TRITON_DROPOUT = None
    return t * dropout_mask(t.shape, p, seed, t.device).to(t.dtype) * (1.0 / (1.0 - p))


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
    """xa = dropout(x) @ A^T with A the (concatenated) LoRA-A weights; saves x and a seed, never the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, p: float, seed: int, dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            xa = seeded_dropout(x2.to(dtype), p, seed) @ a.to(dtype).t()
        ctx.save_for_backward(x, a)
        ctx.p, ctx.seed, ctx.dtype = p, seed, dtype
        return xa.view(*x.shape[:-1], a.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, a = ctx.saved_tensors
        p, seed, dtype = ctx.p, ctx.seed, ctx.dtype
        g2 = g.reshape(-1, g.shape[-1]).to(dtype)
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:
            xd = seeded_dropout(x.reshape(-1, x.shape[-1]).to(dtype), p, seed)
            grad_a = (g2.t() @ xd).to(a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = seeded_dropout(g2 @ a.to(dtype), p, seed).view(x.shape).to(x.dtype)
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
        if ctx.needs_input_grad[1]:
            grad_xa = (g2 @ b.to(dtype)).mul_(s).view(xa.shape).to(xa.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (g2.t() @ xa.reshape(-1, xa.shape[-1]).to(dtype)).mul_(s).to(b.dtype)
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

    def __init__(self, layers: list):
        self.layers = layers
        self.x = None
        self.xa = None
        self.taken: set[int] = set()

    def xa_for(self, layer, x: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
        i = self.layers.index(layer)
        if self.x is not x or i in self.taken:
            a = torch.cat([lay.lora_A[lay.active_adapters[0]].weight for lay in self.layers]) if len(self.layers) > 1 \
                else layer.lora_A[layer.active_adapters[0]].weight
            self.x, self.taken = x, set()
            self.xa = LoraA.apply(x, a, p, draw_seed() if p > 0 else 0, dtype)
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
    if kwargs.get("adapter_names") is not None or not _fusable(self):
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


def fuse_lora(model) -> int:
    """Switch every PEFT LoRA linear of `model` to the fused forward; returns how many layers were switched.

    Siblings named in GROUPS with the same input width and dropout share one A-matmul. The parameters are not
    touched (same tensors, same names), so optimizers, checkpoints and `save_pretrained` see PEFT's model.
    """
    from peft.tuners.lora import LoraLayer

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
                group = LoraGroup(members)
                for m in members:
                    _install(m, group)
                grouped |= {k for k in names if k in children and children[k] in members}
        for k, m in children.items():
            if k not in grouped:
                _install(m, LoraGroup([m]))
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
