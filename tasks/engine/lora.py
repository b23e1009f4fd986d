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
  `fuse_lora(model, dropout="inmatmul")` makes the mask inside the LoRA-A matmuls instead (the x-tile masked as it
  is loaded, grad_x masked before it is stored: no dropout pass at all; tasks/engine/lora_kernels.py), another
  function of the same seed; `fuse_lora(model, dropout="stored")` keeps torch's dropout and its mask (the bench's
  comparison).

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
DROPOUT_MODES = ("seeded", "stored", "inmatmul")


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


def kept_scale(p: float) -> float:
    """What the 16-bit kernels (seeded and in-matmul) multiply kept elements by: 1 / (1 - p') with p' =
    keep_threshold(p) / 65,536."""
    return 65536.0 / (65536 - keep_threshold(p))


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
        _lora_seeded_dropout_kernel[(triton.cdiv(n, PHILOX_WORDS * SUB),)](t, out, n, keep_threshold(p), kept_scale(p), seed,
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


def dropout_backend(device_type: str = "cuda", mode: str = "seeded") -> str:
    """Which path runs dropout mode `mode` ("seeded" or "inmatmul") on `device_type`: "triton" or "torch"."""
    global _TRITON_DROPOUT, _TRITON_CHECKED, _TRITON_INMATMUL, _INMATMUL_CHECKED
    if device_type != "cuda":
        return "torch"
    if mode == "inmatmul":
        if not _INMATMUL_CHECKED:
            _TRITON_INMATMUL, _INMATMUL_CHECKED = _triton_inmatmul(), True
        return "triton" if _TRITON_INMATMUL is not None else "torch"
    if not _TRITON_CHECKED:
        _TRITON_DROPOUT, _TRITON_CHECKED = _triton_dropout(), True
    return "triton" if _TRITON_DROPOUT is not None else "torch"


# --------------------------------------------------------------------------------------------------------
# Dropout inside the LoRA-A matmuls (`dropout="inmatmul"`)
# --------------------------------------------------------------------------------------------------------
#
# The seeded mode above still runs its mask as passes of their own: over x in the forward, again in the recompute,
# again in the backward (to rebuild dropout(x) for grad_A) and over g @ A: each reads and writes the whole input
# (8,192 x 14,336 for down_proj). Here the mask is made where the data already is: the A-matmul masks each x-tile
# as it loads it, grad_A = g^T @ dropout(x) does the same, grad_x = (g @ A) * keep masks the product in the store.
#
# The mapping (one function of (row, column, seed, p), so any block sizes, the forward, recompute and backward,
# and the torch reference all draw the same mask): x is seen as its (rows, K) view; element (m, c) takes 16-bit
# half (c % 8) % 2 of 32-bit word (c % 8) // 2 of Philox-4x32-10 with key = the seed's two 32-bit halves and
# counter (c // 8, m, 0, 0); it is dropped when that half is below `keep_threshold(p)`, and kept elements are scaled
# by 65,536 / (65,536 - threshold) (P(drop) and scale exactly the seeded kernel's). One Philox call serves the 8
# columns a thread loads as one 16-byte bf16 vector. The seeded kernel's mask is another function (of the flat
# index); a model trains with one mode, so the two never need to agree.

LANE = 8  # columns per Philox call in the in-matmul mapping: the 8 bf16 of a 16-byte load
PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)  # Random123's Philox-4x32 constants (Triton's tl.philox uses the same)
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a < 2^32 and int64 b < 2^32, with no int64 overflow (a split in 16-bit halves)."""
    p_lo, p_hi = b * (a & 0xFFFF), b * (a >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _M32


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, seed: int,
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 of the counters (int64 tensors holding 32-bit values) under key (seed's low, high 32 bits), in
    int64 torch arithmetic: the four words `tl.philox(seed, c0, c1, c2, c3)` returns (tests: Random123's known answers)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_MUL[1], c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_MUL[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    return c0, c1, c2, c3


def inmatmul_keep_mask(rows: int, cols: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The in-matmul mode's boolean keep-mask of a (rows, cols) input (the reference: CPU, CUDA without Triton, a
    Triton that failed, and the tests). Built 1,024 rows at a time, which bounds its int64 temporaries."""
    thr = keep_threshold(p)
    lanes = -(-cols // LANE)
    out = torch.empty(rows, cols, dtype=torch.bool, device=device)
    for r0 in range(0, rows, 1024):
        r = min(1024, rows - r0)
        c0 = torch.arange(lanes, device=device, dtype=torch.int64).expand(r, lanes)
        c1 = torch.arange(r0, r0 + r, device=device, dtype=torch.int64)[:, None].expand(r, lanes)
        z = torch.zeros_like(c0)
        w = philox4x32(c0, c1, z, z, seed)
        halves = [w[j // 2] & 0xFFFF if j % 2 == 0 else w[j // 2] >> 16 for j in range(LANE)]  # column 8 l + j: half j
        out[r0:r0 + r] = (torch.stack(halves, -1).reshape(r, lanes * LANE)[:, :cols] >= thr)
    return out


def _triton_inmatmul():
    """The three in-matmul kernels (tasks/engine/lora_kernels.py: `xa`, `grad_x`, `grad_a`), or None without Triton."""
    try:
        from . import lora_kernels
    except Exception:  # a Triton that fails to import (no driver)
        return None
    return lora_kernels if lora_kernels.triton is not None else None


_TRITON_INMATMUL = None
_INMATMUL_CHECKED = False
_INMATMUL_DEVICES = {"cuda"}  # where the kernels run; the tests add "cpu" with the kernels under Triton's interpreter
_INMATMUL_FAILURES: list[str] = []  # one entry per kernel failure that switched this process to the reference


def inmatmul_failures() -> tuple[str, ...]:
    """The errors of the in-matmul kernels that failed in this process (each switched it to the torch reference), oldest
    first: bench/graph_step.py `inmatmul_check` compares the count before and after it runs, so it knows what ran."""
    return tuple(_INMATMUL_FAILURES)


def _inmatmul_triton(op: str, t: torch.Tensor, *args):
    """Kernel `op` of the in-matmul mode on t's device, or None where the torch reference must run (not CUDA, no
    Triton, a dtype the kernels do not compute in (float64: the tests' models), or a Triton that failed once: one
    warning, then the reference for the rest of the process; it draws the same mask, so a forward run by the kernel and a
    backward by the reference still agree)."""
    global _TRITON_INMATMUL, _INMATMUL_CHECKED
    if t.device.type not in _INMATMUL_DEVICES:
        return None
    if not _INMATMUL_CHECKED:
        _TRITON_INMATMUL, _INMATMUL_CHECKED = _triton_inmatmul(), True
    if _TRITON_INMATMUL is None:
        return None
    from .lora_kernels import DTYPES  # loaded with the kernels (`_triton_inmatmul`): a lookup here

    if any(d not in DTYPES for d in (v.dtype if isinstance(v, torch.Tensor) else v for v in (t, *args))
           if isinstance(d, torch.dtype)):
        return None  # the kernels refuse it (under the interpreter float64 came back as garbage, not an error)
    try:
        return getattr(_TRITON_INMATMUL, op)(t, *args)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a Triton that cannot compile here
        warnings.warn(f"fused LoRA: Triton in-matmul dropout failed ({type(e).__name__}: {e}); using the torch reference "
                      "(same mask, separate passes)")
        _INMATMUL_FAILURES.append(f"{op}: {type(e).__name__}: {str(e)[:600]}")
        _TRITON_INMATMUL = None
        return None


def dropout_xa(x2: torch.Tensor, a: torch.Tensor, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """(x2 * keep * scale) @ A^T in `dtype`, the keep-mask `inmatmul_keep_mask(x2's shape, p, seed)`."""
    a = a.to(dtype)  # N x K, small: cast once here rather than in every program that reads it
    out = _inmatmul_triton("xa", x2, a, seed, keep_threshold(p), kept_scale(p), PHILOX_ROUNDS, dtype)
    if out is not None:
        return out
    keep = inmatmul_keep_mask(*x2.shape, p, seed, x2.device)
    return (x2.to(dtype) * keep * kept_scale(p)) @ a.t()


def dropout_grad_x(g2: torch.Tensor, a: torch.Tensor, p: float, seed: int, out_dtype: torch.dtype) -> torch.Tensor:
    """(g2 @ A) * keep * scale in `out_dtype`: the input gradient of `dropout_xa` for the upstream gradient g2."""
    a = a.to(g2.dtype)
    out = _inmatmul_triton("grad_x", g2, a, seed, keep_threshold(p), kept_scale(p), PHILOX_ROUNDS, out_dtype)
    if out is not None:
        return out
    gx = g2 @ a
    return (gx * inmatmul_keep_mask(*gx.shape, p, seed, gx.device) * kept_scale(p)).to(out_dtype)


def dropout_grad_a(g2: torch.Tensor, x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """g2^T @ (x2 * keep * scale), fp32 on the kernel path (g2's dtype on the reference): A's gradient of `dropout_xa`."""
    out = _inmatmul_triton("grad_a", g2, x2, seed, keep_threshold(p), kept_scale(p), PHILOX_ROUNDS)
    if out is not None:
        return out
    keep = inmatmul_keep_mask(*x2.shape, p, seed, x2.device)
    return g2.t() @ (x2.to(g2.dtype) * keep * kept_scale(p))


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


class LoraAInMatmul(torch.autograd.Function):
    """`dropout="inmatmul"` (p > 0): xa = dropout(x) @ A^T with the mask made inside the matmuls (`dropout_xa`,
    `dropout_grad_a`, `dropout_grad_x`): no pass of its own, no dropped copy of x. Saves x and the seed, as LoraA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, p: float, seed: int, dtype: torch.dtype):
        with torch.autocast(device_type=x.device.type, enabled=False):
            xa = dropout_xa(x.reshape(-1, x.shape[-1]), a, p, seed, dtype)
        ctx.save_for_backward(x, a)
        ctx.p, ctx.seed, ctx.dtype = p, seed, dtype
        return xa.view(*x.shape[:-1], a.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, a = ctx.saved_tensors
        p, seed = ctx.p, ctx.seed
        g2 = g.reshape(-1, g.shape[-1]).to(ctx.dtype)
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:
            grad_a = dropout_grad_a(g2, x.reshape(-1, x.shape[-1]), p, seed).to(a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = dropout_grad_x(g2, a, p, seed, x.dtype).view(x.shape)
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
            if p > 0 and self.dropout == "inmatmul":
                self.xa = LoraAInMatmul.apply(x, a, p, draw_seed(), dtype)
            else:
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
    `dropout`: "seeded" (the engine's: mask regenerated from a seed, nothing kept), "inmatmul" (the same, with the
    mask made inside the LoRA-A matmuls instead of separate passes: measured by bench/graph_step.py before it may
    become the default) or "stored" (torch's dropout, dropped input + mask kept for backward as PEFT does; for
    bench/gpu_bench.py's comparison). With dropout 0 all three run the same code. A LoRA dropout p >= 1 is refused
    (ValueError): PEFT's adapter is then dead weight, and none of the three modes computes its zeros.
    """
    from peft.tuners.lora import LoraLayer

    if dropout not in DROPOUT_MODES:
        raise ValueError(f"fuse_lora: dropout={dropout!r} is not one of {DROPOUT_MODES}")
    # p >= 1 (PEFT: every input dropped, the adapter's output and gradients zero) is refused in every mode: the seeded
    # and stored modes divide by 1 - p (ZeroDivisionError in the first forward), and the kernels' 16-bit threshold caps
    # P(drop) at 65,535 / 65,536, keeping one element in 65,536 scaled by 65,536 where PEFT gives zeros.
    dead = [name for name, m in model.named_modules() if _switchable(m, LoraLayer)
            and any(isinstance(d, torch.nn.Dropout) and d.p >= 1 for d in m.lora_dropout.values())]
    if dead:
        more = f" and {len(dead) - 1} more layers" if len(dead) > 1 else ""
        raise ValueError(f"fuse_lora: LoRA dropout p >= 1 on {dead[0]}{more}: every adapter input would be dropped and the "
                         "adapter never trains; use a p in [0, 1) (lora.dropout; 0.05 is the usual LoRA dropout)")
    n = 0
    for parent in model.modules():
        children = {k: m for k, m in parent.named_children() if _switchable(m, LoraLayer)}
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


def _switchable(m, lora_layer_class) -> bool:
    """A PEFT LoRA linear that `fuse_lora` switches (those not `_fusable` at call time run PEFT's forward from it)."""
    return isinstance(m, lora_layer_class) and isinstance(m, torch.nn.Module) and hasattr(m, "lora_A") and _is_linear(m)


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
