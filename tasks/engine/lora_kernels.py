"""Triton kernels of the fused LoRA path's in-matmul dropout (`fuse_lora(model, dropout="inmatmul")`,
tasks/engine/lora.py): the LoRA-A matmul, its input gradient and its weight gradient, each applying the dropout mask
to the tile it loads or stores, so the mask is never a pass of its own.

The mask is the mapping documented in lora.py's in-matmul section (its torch reference: `inmatmul_keep_mask`):
element (m, c) of the (rows, K) view is dropped when 16-bit half c % 8 of Philox-4x32(key = seed, counter =
(c // 8, m, 0, 0)) is below `threshold`; one Philox call serves the 8 adjacent columns a thread loads as one 16-byte
bf16 vector, and no block size enters the mapping. Kept elements are scaled by `scale` on the fp32 accumulator.

Used by lora.py where Triton imports (without it the module imports, its kernels undecorated and never called).
`triton.jit` reads TRITON_INTERPRET when this module is executed: the tests load a private copy under the
interpreter (CPU tensors).
Block sizes are fixed, not autotuned (a first version, to be measured: bench/graph_step.py `eager-dropout-inmatmul`).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install: the module still imports (tests/test_imports.py), lora.py never calls it
    triton = tl = None


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def _keep_tile(seed, rows, k0, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDS: tl.constexpr):
    """Keep-mask of rows `rows` (BLOCK_M,) x columns k0 .. k0 + BLOCK_K (k0 a multiple of 8)."""
    lanes = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    c0 = (lanes[None, :] + rows[:, None] * 0).to(tl.uint32)
    c1 = (rows[:, None] + lanes[None, :] * 0).to(tl.uint32)
    z = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, z, z, ROUNDS)
    h0, h1 = r0 & 0xFFFF, r0 >> 16
    h2, h3 = r1 & 0xFFFF, r1 >> 16
    h4, h5 = r2 & 0xFFFF, r2 >> 16
    h6, h7 = r3 & 0xFFFF, r3 >> 16
    # join appends an axis of 2; flattening (lane, a, b, c) gives column 8 lane + 4a + 2b + c, so the innermost pairs
    # are halves 4 apart (h0/h4), the next level 2 apart, the outermost 1 apart: column 8 lane + j holds h_j.
    even = tl.join(tl.join(h0, h4), tl.join(h2, h6))
    odd = tl.join(tl.join(h1, h5), tl.join(h3, h7))
    u = tl.reshape(tl.join(even, odd), (BLOCK_M, BLOCK_K))
    return u.to(tl.int32) >= threshold


@_jit
def _lora_dropout_xa_kernel(x_ptr, a_ptr, out_ptr, M, K, N, sxm, sxk, san, sak, som, seed, threshold, scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDS: tl.constexpr,
                            PRECISION: tl.constexpr):
    """out = (x * keep) @ A^T * scale: each x-tile masked as it is loaded."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cdt = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        x = tl.where(_keep_tile(seed, rm, k0, threshold, BLOCK_M, BLOCK_K, ROUNDS), x.to(cdt), 0.0).to(cdt)
        at = tl.load(a_ptr + rn[None, :] * san + rk[:, None] * sak, mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        acc = tl.dot(x, at.to(cdt), acc, input_precision=PRECISION)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * som + rn[None, :], (acc * scale).to(cdt), mask=(rm[:, None] < M) & (rn[None, :] < N))


@_jit
def _lora_dropout_grad_x_kernel(g_ptr, a_ptr, out_ptr, M, K, N, sgm, sgn, san, sak, som, seed, threshold, scale,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDS: tl.constexpr,
                                PRECISION: tl.constexpr):
    """out = (g @ A) * keep * scale: the mask applied to the product tile before it is stored."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    cdt = g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * sgm + rn[None, :] * sgn, mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        a = tl.load(a_ptr + rn[:, None] * san + rk[None, :] * sak, mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        acc = tl.dot(g, a.to(cdt), acc, input_precision=PRECISION)
    out = tl.where(_keep_tile(seed, rm, k0, threshold, BLOCK_M, BLOCK_K, ROUNDS), acc * scale, 0.0)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * som + rk[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@_jit
def _lora_dropout_grad_a_kernel(g_ptr, x_ptr, out_ptr, M, K, N, sgm, sgn, sxm, sxk, rows_per_split, seed, threshold, scale,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDS: tl.constexpr,
                                PRECISION: tl.constexpr):
    """out[split] = g[rows]^T @ (x[rows] * keep) * scale over this split's rows, in fp32 (the splits are summed after)."""
    k0 = tl.program_id(0) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    cdt = g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    m_end = tl.minimum(M, (split + 1) * rows_per_split)
    for m0 in range(split * rows_per_split, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :] * sxk, mask=(rm[:, None] < m_end) & (rk[None, :] < K), other=0.0)
        x = tl.where(_keep_tile(seed, rm, k0, threshold, BLOCK_M, BLOCK_K, ROUNDS), x.to(cdt), 0.0).to(cdt)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * sgm + rn[None, :] * sgn, mask=(rm[:, None] < m_end) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
    tl.store(out_ptr + split.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :], acc * scale, mask=(rn[:, None] < N) & (rk[None, :] < K))


DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels compute in (tl.dot's operands here)


def _check_dtypes(op: str, *dtypes: torch.dtype) -> None:
    """Refuse what the kernels do not compute in: float64 came back from Triton's interpreter as garbage (~1e289), not an
    error. lora.py routes the dtypes outside DTYPES to the torch reference before it calls a kernel."""
    bad = sorted({str(d) for d in dtypes if d not in DTYPES})
    if bad:
        raise TypeError(f"lora_kernels.{op}: {', '.join(bad)} not supported (the kernels compute in float32, float16 or "
                        f"bfloat16); tasks.engine.lora.dropout_{op} runs the torch reference for other dtypes")


def _block_n(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: full-precision products, as torch's matmul (TF32 off)


def xa(x2: torch.Tensor, a: torch.Tensor, seed: int, threshold: int, scale: float, rounds: int, dtype: torch.dtype) -> torch.Tensor:
    """(x2 * keep * scale) @ A^T in `dtype` (M, N). Tiles: 32 rows x 128 columns of x per step, N in tiles of <= 128."""
    _check_dtypes("xa", x2.dtype, a.dtype, dtype)
    (m, k), n = x2.shape, a.shape[0]
    out = torch.empty(m, n, device=x2.device, dtype=dtype)
    if m == 0:
        return out
    bm, bk, bn = 32, 128, _block_n(n, 128)
    _lora_dropout_xa_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2, a, out, m, k, n, x2.stride(0), x2.stride(1), a.stride(0), a.stride(1), out.stride(0), seed, threshold, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ROUNDS=rounds, PRECISION=_precision(dtype), num_warps=4)
    return out


def grad_x(g2: torch.Tensor, a: torch.Tensor, seed: int, threshold: int, scale: float, rounds: int, out_dtype: torch.dtype) -> torch.Tensor:
    """(g2 @ A) * keep * scale in `out_dtype` (M, K), computed in g2's dtype. Output tiles of 64 x 128, N in steps of <= 64."""
    _check_dtypes("grad_x", g2.dtype, a.dtype, out_dtype)
    (m, n), k = g2.shape, a.shape[1]
    out = torch.empty(m, k, device=g2.device, dtype=out_dtype)
    if m == 0:
        return out
    bm, bk, bn = 64, 128, _block_n(n, 64)
    _lora_dropout_grad_x_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
        g2, a, out, m, k, n, g2.stride(0), g2.stride(1), a.stride(0), a.stride(1), out.stride(0), seed, threshold, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ROUNDS=rounds, PRECISION=_precision(g2.dtype), num_warps=4)
    return out


def grad_a(g2: torch.Tensor, x2: torch.Tensor, seed: int, threshold: int, scale: float, rounds: int) -> torch.Tensor:
    """g2^T @ (x2 * keep * scale) in fp32 (N, K), computed in g2's dtype. The output is small (N x K) and the
    reduction long (M rows): the rows split across programs until there are ~2 per SM; each split writes its own
    partial sum and torch adds them in a fixed order (deterministic, no atomics)."""
    _check_dtypes("grad_a", g2.dtype, x2.dtype)
    (m, n), k = g2.shape, x2.shape[1]
    if m == 0:
        return torch.zeros(n, k, device=g2.device, dtype=torch.float32)
    bm, bk, bn = 64, 64, _block_n(n, 128)
    tiles = triton.cdiv(k, bk) * triton.cdiv(n, bn)
    sms = torch.cuda.get_device_properties(g2.device).multi_processor_count if g2.is_cuda else 4
    splits = max(1, min(triton.cdiv(m, bm), triton.cdiv(2 * sms, tiles)))
    rows = triton.cdiv(triton.cdiv(m, splits), bm) * bm  # whole row steps per split
    splits = triton.cdiv(m, rows)
    part = torch.empty(splits, n, k, device=g2.device, dtype=torch.float32)
    _lora_dropout_grad_a_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn), splits)](
        g2, x2, part, m, k, n, g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1), rows, seed, threshold, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ROUNDS=rounds, PRECISION=_precision(g2.dtype), num_warps=4)
    return part[0] if splits == 1 else part.sum(0)
