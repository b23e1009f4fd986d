"""Contracts of the fused LoRA path (tasks/engine/lora.py), fp32 on CPU.

* the autograd functions: forward and gradients equal to the plain-torch formula, the dropout mask
  regenerated from the seed in backward is the forward's (no mask stored);
* on a tiny Mistral with PEFT LoRA on all 7 projections: the fused forward and every gradient equal PEFT's
  (dropout 0), with one LoRA-A matmul per q/k/v group and per gate/up group;
* dropout > 0 under gradient checkpointing: the recomputed forward draws the same masks (gradients equal to a
  run without recompute) and dropout really applies;
* dropout in the matmul (`dropout="inmatmul"`): the torch reference's Philox equals Random123's known answers, its
  mask depends on (row, column, seed, p) only and drops at rate p; the Triton kernels (tasks/engine/lora_kernels.py,
  run on CPU by Triton's interpreter where Triton is installed, skipped otherwise) apply exactly that mask in the
  forward, grad_x and grad_A and match a float64 reference on shapes that leave partial tiles; dtypes they do not
  compute in (float64) take the reference; a kernel that fails falls back to the reference with one warning, and
  bench/graph_step.py's `inmatmul_check` then reports not-ok; `fuse_lora(dropout="inmatmul")` on a tiny Mistral equals
  PEFT whose dropout applies the reference mask with the same seeds; p >= 1 is refused in every mode;
* the engine: per-step loss of `engine: fused` (padding-free packs) equals the seed engine `padded` (padded
  batches) on the same samples over 4 AdamW steps within 1e-3 relative; the saved adapter is a normal PEFT
  adapter that reloads to the same outputs.
Tolerances: fp32, only summation order differs -> 1e-5 absolute on outputs and gradients.
"""

import itertools
import types
import warnings
from pathlib import Path

import pytest
import torch

from tasks.engine import lora as lora_mod
from tasks.engine.lora import (
    STORED,
    LoraA,
    LoraAInMatmul,
    LoraBInPlace,
    dropout_backend,
    dropout_mask,
    fuse_lora,
    inmatmul_keep_mask,
    kept_scale,
    keep_threshold,
    philox4x32,
    seeded_dropout,
    unfuse_lora,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_a_reference(x, a, keep, p, g):
    """What LoraA must compute, in fp32 autograd: y = (x * keep / (1 - p)) @ A^T, and the gradients of x and A
    for the upstream gradient g."""
    xr, ar = x.detach().float().requires_grad_(), a.detach().float().requires_grad_()
    ref = (xr * keep / (1 - p)) @ ar.t()
    ref.backward(g.float())
    return ref, xr.grad, ar.grad


def test_lora_a_regenerates_the_forward_mask_and_matches_the_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 32, requires_grad=True)
    a = torch.randn(12, 32, requires_grad=True)
    p, seed = 0.3, 1234
    out = LoraA.apply(x, a, p, seed, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)

    keep = dropout_mask(torch.Size([100, 32]), p, seed, x.device).view(2, 50, 32)
    assert torch.equal(keep, dropout_mask(torch.Size([100, 32]), p, seed, x.device).view(2, 50, 32))  # same seed, same mask
    assert not torch.equal(keep, dropout_mask(torch.Size([100, 32]), p, seed + 1, x.device).view(2, 50, 32))
    assert 0.25 < 1 - keep.float().mean().item() < 0.35  # P(drop) = p
    ref, ref_gx, ref_ga = _lora_a_reference(x, a, keep, p, g)
    assert torch.allclose(out, ref, atol=ATOL)
    assert torch.allclose(x.grad, ref_gx, atol=ATOL) and torch.allclose(a.grad, ref_ga, atol=ATOL)


def test_lora_a_stored_variant_keeps_torchs_mask_and_matches_the_formula():
    """dropout="stored" (the bench's comparison variant): torch's dropout, mask kept; forward and backward use it."""
    x = torch.randn(2, 50, 32, requires_grad=True)
    a = torch.randn(12, 32, requires_grad=True)
    p = 0.3
    torch.manual_seed(5)
    out = LoraA.apply(x, a, p, STORED, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)
    torch.manual_seed(5)  # the same draw, read back
    _, keep = torch.native_dropout(x.detach().reshape(-1, 32), p, True)
    keep = keep.view(2, 50, 32)
    assert 0.25 < 1 - keep.float().mean().item() < 0.35
    ref, ref_gx, ref_ga = _lora_a_reference(x, a, keep, p, g)
    assert torch.allclose(out, ref, atol=ATOL)
    assert torch.allclose(x.grad, ref_gx, atol=ATOL) and torch.allclose(a.grad, ref_ga, atol=ATOL)


def test_seeded_dropout_in_place_writes_the_same_values_into_its_input():
    t = torch.randn(64, 48)
    ref = seeded_dropout(t, 0.25, 11)
    u = t.clone()
    out = seeded_dropout(u, 0.25, 11, inplace=True)
    assert out.data_ptr() == u.data_ptr() and torch.allclose(out, ref) and not torch.equal(out, t)
    assert seeded_dropout(t, 0.0, 11) is t  # p = 0: no kernel, no copy
    assert keep_threshold(0.05) == 3277 and keep_threshold(0.0) == 0


def test_lora_b_adds_in_place_with_the_scale():
    torch.manual_seed(1)
    base_w = torch.randn(24, 16, requires_grad=True)
    x = torch.randn(3, 7, 16, requires_grad=True)
    xa = torch.randn(3, 7, 4, requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    result = torch.nn.functional.linear(x, base_w)
    ptr = result.data_ptr()
    out = LoraBInPlace.apply(result, xa, b, 2.0)
    assert out.data_ptr() == ptr  # no new (tokens x out) tensor
    g = torch.randn_like(out)
    out.backward(g)
    xr, xar, br, wr = (t.detach().clone().requires_grad_() for t in (x, xa, b, base_w))
    ref = torch.nn.functional.linear(xr, wr) + 2.0 * (xar @ br.t())
    ref.backward(g)
    assert torch.allclose(out, ref, atol=ATOL)
    for t, r in ((x, xr), (xa, xar), (b, br), (base_w, wr)):
        assert torch.allclose(t.grad, r.grad, atol=ATOL)


# ------------------------------------------------------------------------------ dropout inside the matmuls


def _inmatmul_reference(x, a, keep, scale, g):
    """What the in-matmul mode computes, in float64: y = (x * keep * scale) @ A^T, grad_x = (g @ A) * keep * scale,
    grad_A = g^T @ (x * keep * scale)."""
    xd = x.detach().double() * keep * scale
    a64, g64 = a.detach().double(), g.double()
    return xd @ a64.t(), (g64 @ a64) * keep * scale, g64.transpose(-1, -2) @ xd


def _close(u, v, rtol):
    """Max-abs error relative to the reference's largest entry (rows of near-zero sums make elementwise rtol meaningless)."""
    return (u.double() - v).abs().max().item() <= rtol * v.abs().max().item()


def test_philox_reference_gives_random123s_known_answers():
    """The torch Philox-4x32-10 behind the in-matmul mask's reference (CPU, CUDA without Triton) against Random123's
    known-answer vectors, so it is the generator Triton's `tl.philox` implements."""
    def words(ctr, key):
        c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
        return [int(w) for w in philox4x32(*c, key[1] << 32 | key[0])]

    m = 0xFFFFFFFF
    assert words((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words((m, m, m, m), (m, m)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_inmatmul_mask_is_a_function_of_position_and_seed_and_drops_at_rate_p(p):
    seed = 2**61 + 12345  # both 32-bit halves of Philox's key in use
    keep = inmatmul_keep_mask(300, 1001, p, seed, torch.device("cpu"))
    assert torch.equal(keep, inmatmul_keep_mask(300, 1001, p, seed, "cpu"))
    assert torch.equal(keep[:37, :203], inmatmul_keep_mask(37, 203, p, seed, "cpu"))  # no shape in an element's draw
    assert not torch.equal(keep, inmatmul_keep_mask(300, 1001, p, seed + 1, "cpu"))
    assert not torch.equal(keep, inmatmul_keep_mask(300, 1001, p, seed + 2**32, "cpu"))  # the key's high half counts
    q = keep_threshold(p) / 65536
    drop = ~keep

    def within(share, prob, n):  # 5 binomial standard deviations
        return abs(share - prob) < 5 * (prob * (1 - prob) / n) ** 0.5

    assert within(drop.float().mean().item(), q, drop.numel())
    # each of the 8 columns one Philox call serves drops at rate p, and neighbours drop independently
    per_half = drop[:, :1000].reshape(300, 125, 8).float().mean((0, 1))
    assert all(within(s, q, 300 * 125) for s in per_half.tolist()), per_half
    assert within((drop[:, 1:] & drop[:, :-1]).float().mean().item(), q * q, 300 * 1000)
    assert within((drop[1:] & drop[:-1]).float().mean().item(), q * q, 299 * 1001)
    assert kept_scale(p) == 65536 / (65536 - keep_threshold(p))


def test_reference_mask_rows_past_the_first_1024_row_chunk():
    """`inmatmul_keep_mask` builds 1,024 rows at a time: rows past the first chunk draw with their own row counter, as
    the mapping computed for every row at once (from `philox4x32` directly) says."""
    rows, cols, p, seed = 2100, 20, 0.5, 2**40 + 5
    keep = inmatmul_keep_mask(rows, cols, p, seed, "cpu")
    r = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, 3)  # unchunked: every row at once
    c = torch.arange(3, dtype=torch.int64).expand(rows, 3)
    w = philox4x32(c, r, torch.zeros_like(c), torch.zeros_like(c), seed)
    halves = torch.stack([w[j // 2] & 0xFFFF if j % 2 == 0 else w[j // 2] >> 16 for j in range(8)], -1).reshape(rows, 24)
    assert torch.equal(keep, halves[:, :cols] >= keep_threshold(p))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_lora_a_in_matmul_matches_the_formula_with_the_reference_mask(p):
    """CPU (the torch reference path): forward and both gradients equal the float64 formula with `inmatmul_keep_mask`,
    and grad_x is zero exactly where x was dropped."""
    torch.manual_seed(0)
    x = torch.randn(3, 23, 37, requires_grad=True)  # 69 rows of 37
    a = torch.randn(13, 37, requires_grad=True)
    seed = 987654321987
    out = LoraAInMatmul.apply(x, a, p, seed, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)
    keep = inmatmul_keep_mask(69, 37, p, seed, x.device).view(3, 23, 37)
    ref, ref_gx, ref_ga = _inmatmul_reference(x, a, keep, kept_scale(p), g)
    ref_ga = ref_ga.sum(0)  # batched g^T @ xd, summed over the leading axis
    assert _close(out, ref, 1e-5) and _close(x.grad, ref_gx, 1e-5) and _close(a.grad, ref_ga, 1e-5)
    assert torch.equal(x.grad == 0, ~keep)


def test_a_failing_kernel_falls_back_to_the_reference_with_one_warning(monkeypatch):
    """A Triton that fails at runtime (a compile error): one warning, then the torch reference, which draws the same
    mask, for this call and every later one."""
    def broken(*args):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(lora_mod, "_INMATMUL_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(lora_mod, "_TRITON_INMATMUL", types.SimpleNamespace(xa=broken, grad_x=broken, grad_a=broken))
    monkeypatch.setattr(lora_mod, "_INMATMUL_CHECKED", True)
    torch.manual_seed(1)
    x = torch.randn(40, 24, requires_grad=True)
    a = torch.randn(8, 24, requires_grad=True)
    p, seed = 0.3, 4242
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = LoraAInMatmul.apply(x, a, p, seed, torch.float32)
        g = torch.randn_like(out)
        out.backward(g)
    assert [str(w.message)[:40] for w in caught] == ["fused LoRA: Triton in-matmul dropout fai"]
    assert lora_mod._TRITON_INMATMUL is None
    ref, ref_gx, ref_ga = _inmatmul_reference(x, a, inmatmul_keep_mask(40, 24, p, seed, "cpu"), kept_scale(p), g)
    assert _close(out, ref, 1e-5) and _close(x.grad, ref_gx, 1e-5) and _close(a.grad, ref_ga, 1e-5)


def test_inmatmul_check_does_not_report_ok_for_kernels_that_never_ran(monkeypatch):
    """bench/graph_step.py `inmatmul_check` (CUDA faked on CPU) with kernels that raise on their first call: the torch
    reference ran in their place, so the check must say so (not-ok, the backend that ran, the kernel's error), not
    compare the reference with itself and report ok for "triton"."""
    gs = pytest.importorskip("bench.graph_step")

    def broken(*a):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(lora_mod, "_INMATMUL_DEVICES", {"cpu"})
    monkeypatch.setattr(lora_mod, "_INMATMUL_CHECKED", True)
    monkeypatch.setattr(lora_mod, "_TRITON_INMATMUL", types.SimpleNamespace(xa=broken, grad_x=broken, grad_a=broken))
    real_backend, randn = lora_mod.dropout_backend, torch.randn
    monkeypatch.setattr(lora_mod, "dropout_backend", lambda dev="cuda", mode="seeded": real_backend("cuda", mode))
    monkeypatch.setattr(torch, "randn", lambda *a, **k: randn(*a, **{n: v for n, v in k.items() if n != "device"}))

    class Event:
        def __init__(self, **k):
            pass

        def record(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setitem(gs.SHAPES, "tiny", ("tiny", {"hidden_size": 64, "intermediate_size": 96}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gs.safe_inmatmul_check("tiny")
    assert not res["ok"] and res["backend"] == "torch" and "PassManager::run failed" in res["error"], res
    assert "fwd_bwd_ms" not in res  # no "inmatmul" time taken from the reference


# The kernels under Triton's interpreter run in a subprocess: `triton.jit` picks interpreter or compiler when a function
# is decorated, Triton's own library functions (tl.zeros, ...) included, so TRITON_INTERPRET must be set before the
# process first imports triton, which this one may already have done (transformers, peft). The subprocess computes the
# kernels' outputs and saves them with their inputs; the tests build the references here. The interpreter keeps bf16
# as raw 16-bit integers, so the half-precision cases run fp16; bf16 is checked on the GPU (bench/graph_step.py
# `inmatmul_check`, test_cuda_inmatmul_kernels_match_the_reference_in_bf16).
PARTIAL_TILES = [(70, 203, 20, "float32"), (45, 136, 130, "float32"), (70, 203, 20, "float16")]  # m, k, n, dtype
INTERPRETED = r"""
import json, sys
import torch
import triton
import triton.language as tl


@triton.jit
def probe(o_ptr, n):
    for i in range(0, n, 4):
        tl.store(o_ptr + i + tl.arange(0, 4), tl.zeros((4,), dtype=tl.float32) + i)


try:  # an interpreter that cannot run a loop over a runtime bound (Triton 3.6 under numpy >= 2.4) is this box's limit
    probe[(1,)](torch.empty(8), 8)
except Exception as e:
    print(f"INTERPRETER UNUSABLE: Triton {triton.__version__}: {type(e).__name__}: {str(e)[:200]}")
    sys.exit(3)

from tasks.engine import lora, lora_kernels
from tasks.engine.lora import PHILOX_ROUNDS, LoraAInMatmul, kept_scale, keep_threshold

cases, out = json.loads(sys.argv[2]), {}


def args(p, seed):
    return seed, keep_threshold(p), kept_scale(p), PHILOX_ROUNDS


n = 150  # masks read back through identity matrices (fp32: exact)
eye, ones = torch.eye(n), torch.ones(n, n)
out["identity"] = {"xa": lora_kernels.xa(ones, eye, *args(0.5, 31337), torch.float32),
                   "grad_x": lora_kernels.grad_x(eye, ones, *args(0.5, 31337), torch.float32),
                   "grad_a": lora_kernels.grad_a(eye, ones, *args(0.5, 31337))}
for p in (0.05, 0.5):
    for m, k, n, dt in cases:
        dtype, gen = getattr(torch, dt), torch.Generator().manual_seed(m * k + n)
        x = torch.randn(m, k + 9, generator=gen).to(dtype)[:, 5:5 + k]  # a column slice: row stride k + 9
        a, g = torch.randn(n, k, generator=gen).to(dtype), torch.randn(m, n, generator=gen).to(dtype)
        out[(p, m, k, n, dt)] = {"x": x.contiguous(), "a": a, "g": g, "xa": lora_kernels.xa(x, a, *args(p, 2**40 + 99), dtype),
                                 "grad_x": lora_kernels.grad_x(g, a, *args(p, 2**40 + 99), torch.float32),
                                 "grad_a": lora_kernels.grad_a(g, x, *args(p, 2**40 + 99))}

# LoraAInMatmul on these kernels, in two layers under torch.utils.checkpoint and without: the recompute draws its seeds
# from the restored CPU generator and the kernels regenerate the same masks.
lora._INMATMUL_DEVICES, lora._TRITON_INMATMUL, lora._INMATMUL_CHECKED = {"cpu", "cuda"}, lora_kernels, True
gen = torch.Generator().manual_seed(3)
x0 = torch.randn(2, 33, 40, generator=gen)
a1, a2 = (torch.randn(24, 40, generator=gen) * 0.3).requires_grad_(), (torch.randn(40, 24, generator=gen) * 0.3).requires_grad_()


def block(x):
    h = torch.tanh(LoraAInMatmul.apply(x, a1, 0.3, lora.draw_seed(), torch.float32))
    return LoraAInMatmul.apply(h, a2, 0.3, lora.draw_seed(), torch.float32)


for name, checkpointed in (("plain", False), ("checkpointed", True)):
    torch.manual_seed(11)
    x = x0.clone().requires_grad_()
    y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
    torch.manual_seed(12)  # the loss weights: another stream than the seeds
    (y * torch.randn(y.shape)).sum().backward()
    out[name] = {"y": y.detach(), "x": x.grad, "a1": a1.grad.clone(), "a2": a2.grad.clone()}
    a1.grad = a2.grad = None

# float64 (the kernels compute in fp32/fp16/bf16; the interpreter returned ~1e289 for it): a direct kernel call refuses it,
# lora.py's dispatcher (the kernels installed above) runs the torch reference for it and keeps the kernels for later calls.
gen = torch.Generator().manual_seed(0)
x, a, g = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((40, 24), (8, 24), (40, 8)))
try:
    lora_kernels.xa(x, a, *args(0.3, 5), torch.float64)
    out["float64"] = {"direct": "no error"}
except TypeError as e:
    out["float64"] = {"direct": str(e)}
failed_before = len(lora.inmatmul_failures())
out["float64"].update(x=x, a=a, g=g, xa=lora.dropout_xa(x, a, 0.3, 5, torch.float64),
                      grad_x=lora.dropout_grad_x(g, a, 0.3, 5, torch.float64), grad_a=lora.dropout_grad_a(g, x, 0.3, 5),
                      kernels_kept=lora._TRITON_INMATMUL is lora_kernels,
                      failures=len(lora.inmatmul_failures()) - failed_before)
torch.save(out, sys.argv[1])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The kernels' outputs under Triton's interpreter (the INTERPRETED script in a subprocess); skips without Triton or
    where its interpreter cannot run here. A kernel that raises fails the tests that use this."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: the in-matmul kernels are tested in its interpreter")
    path = tmp_path_factory.mktemp("interpreted") / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED, str(path), json.dumps(PARTIAL_TILES)],
                       cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 3 and "INTERPRETER UNUSABLE" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return torch.load(path)


def test_triton_kernels_drop_exactly_the_reference_elements_in_forward_and_backward(interpreted):
    """Each kernel's mask read back through identity matrices: the forward (1 * keep) @ I, grad_x (I @ 1) * keep and
    grad_A I^T @ (1 * keep) drop the same elements, those `inmatmul_keep_mask` drops. 150 x 150: two tiles on every
    axis, the last partial."""
    keep = inmatmul_keep_mask(150, 150, 0.5, 31337, "cpu")
    for name, out in interpreted["identity"].items():
        assert torch.equal(out != 0, keep), name


@pytest.mark.parametrize("p", [0.05, 0.5])
@pytest.mark.parametrize("m,k,n,dtype", PARTIAL_TILES)
def test_triton_kernels_match_float64_on_partial_tiles(interpreted, p, m, k, n, dtype):
    """M, K, N off every block size (K not a multiple of 8; N over one 128-wide tile), x a column slice of a wider
    tensor (row stride != K), grad_A's rows split over programs: the three kernels against the float64 formula."""
    r = interpreted[(p, m, k, n, dtype)]
    keep = inmatmul_keep_mask(m, k, p, 2**40 + 99, "cpu")
    ref, ref_gx, ref_ga = _inmatmul_reference(r["x"], r["a"], keep, kept_scale(p), r["g"])
    assert r["xa"].dtype == getattr(torch, dtype) and r["grad_x"].dtype == r["grad_a"].dtype == torch.float32
    assert _close(r["xa"], ref, 1e-5 if dtype == "float32" else 2e-3)  # fp16 output: its rounding
    assert _close(r["grad_x"], ref_gx, 1e-5) and _close(r["grad_a"], ref_ga, 1e-5)  # fp32 sums of exact products
    assert torch.equal(r["grad_x"] == 0, ~keep)


def test_triton_kernels_under_checkpoint_recompute_give_identical_gradients(interpreted):
    """Two LoraAInMatmul layers on the kernels: gradients with torch.utils.checkpoint equal those without, exactly."""
    plain, ckpt = interpreted["plain"], interpreted["checkpointed"]
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name
    assert (plain["x"] == 0).float().mean() < 0.5  # dropout applied, gradients not all dropped


def test_xa_kernel_on_float64_inputs(interpreted):
    """float64, which the kernels do not compute in (under the interpreter xa returned ~1e289): a direct kernel call
    raises TypeError naming the dtype; through lora.py with the kernels installed, the torch reference runs, the result
    is right, and the kernels stay installed (no failure recorded)."""
    r = interpreted["float64"]
    assert "float64 not supported" in r["direct"], r["direct"]
    keep = inmatmul_keep_mask(40, 24, 0.3, 5, "cpu")
    ref, ref_gx, ref_ga = _inmatmul_reference(r["x"], r["a"], keep, kept_scale(0.3), r["g"])
    assert r["xa"].dtype == r["grad_x"].dtype == r["grad_a"].dtype == torch.float64
    assert _close(r["xa"], ref, 1e-12) and _close(r["grad_x"], ref_gx, 1e-12) and _close(r["grad_a"], ref_ga, 1e-12)
    assert r["kernels_kept"] and r["failures"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the in-matmul kernels' bf16 check runs on CUDA only")
def test_cuda_inmatmul_kernels_match_the_reference_in_bf16():
    """On the GPU (bench call): the compiled kernels in bf16 against the reference mask and formula."""
    p, seed = 0.05, 77
    x = torch.randn(4099, 520, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(53, 520, device="cuda") * 0.05).requires_grad_()
    assert dropout_backend("cuda", "inmatmul") == "triton"
    out = LoraAInMatmul.apply(x, a, p, seed, torch.bfloat16)
    g = torch.randn_like(out)
    out.backward(g)
    keep = inmatmul_keep_mask(4099, 520, p, seed, x.device)
    ref, ref_gx, ref_ga = _inmatmul_reference(x, a.bfloat16(), keep, kept_scale(p), g)
    assert _close(out, ref, 1e-2) and _close(x.grad, ref_gx, 1e-2) and _close(a.grad, ref_ga, 1e-3)
    assert torch.equal(x.grad == 0, ~keep)


def tiny_lora_model(dropout: float, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, attn_implementation="sdpa")
    model = MistralForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():  # PEFT starts B at zero; random B makes every gradient path non-trivial
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.1)
    return model.train()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def lora_grads(model, inputs, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_model_equals_peft_and_shares_one_a_matmul_per_group(monkeypatch):
    model = tiny_lora_model(dropout=0.0)
    inputs = batch()
    logits_ref, grads_ref = lora_grads(model, inputs)
    assert fuse_lora(model) == 2 * 7
    calls = []
    real = LoraA.apply
    monkeypatch.setattr(LoraA, "apply", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    logits, grads = lora_grads(model, inputs)
    # Per layer: q/k/v in one A-matmul (3 x r rows), gate/up in one (2 x r), o and down alone.
    assert sorted(calls) == sorted([12, 8, 4, 4] * 2)
    assert torch.allclose(logits, logits_ref, atol=ATOL)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * 2
    for n in grads:
        assert torch.allclose(grads[n], grads_ref[n], atol=ATOL), n
    unfuse_lora(model)
    calls.clear()
    assert torch.allclose(lora_grads(model, inputs)[0], logits_ref, atol=ATOL) and not calls


SLOT = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}  # seed draw order


class _ReferenceMaskDropout(torch.nn.Module):
    """PEFT's lora_dropout replaced by the in-matmul mode's reference mask for a fixed seed."""

    def __init__(self, seed, p):
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x):
        keep = inmatmul_keep_mask(x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1], self.p, self.seed, x.device)
        return x * keep.view(x.shape) * kept_scale(self.p)


def test_fused_inmatmul_model_equals_peft_with_the_same_masks(monkeypatch):
    """`fuse_lora(dropout="inmatmul")` really routes through the in-matmul path at the layer's p: in float64, the fused
    tiny Mistral's logits and every LoRA gradient equal PEFT's whose lora_dropout applies `inmatmul_keep_mask` with the
    seeds the fused path draws (one per group and layer, in order q/k/v, o, gate/up, down)."""
    p, inputs = 0.3, batch(3)
    ref = tiny_lora_model(dropout=p).double()
    for name, m in ref.named_modules():
        if hasattr(m, "lora_dropout") and "default" in m.lora_dropout:
            layer = int(name.split("layers.")[1].split(".")[0])
            m.lora_dropout["default"] = _ReferenceMaskDropout(1000 + 4 * layer + SLOT[name.rsplit(".", 1)[1]], p)
    logits_ref, grads_ref = lora_grads(ref, inputs)
    fused = tiny_lora_model(dropout=p).double()
    fuse_lora(fused, dropout="inmatmul")
    counter = itertools.count(1000)
    monkeypatch.setattr(lora_mod, "draw_seed", lambda: next(counter))
    logits, grads = lora_grads(fused, inputs)
    assert next(counter) == 1000 + 4 * 2  # one seed per group and layer
    assert torch.allclose(logits, logits_ref, atol=1e-10)
    for n in grads:
        assert torch.allclose(grads[n], grads_ref[n], atol=1e-10), n


def test_fuse_refuses_dropout_one_in_every_mode():
    """p = 1: PEFT's adapter output and gradients are zeros, which no mode computes (seeded and stored divide by 1 - p;
    the kernels' 16-bit threshold keeps one element in 65,536, scaled by 65,536): refused at fuse time, layers untouched."""
    model = tiny_lora_model(dropout=1.0)
    for mode in ("seeded", "stored", "inmatmul"):
        with pytest.raises(ValueError, match=r"p >= 1 on .*layers\.0\.self_attn\.q_proj and 13 more layers.*\[0, 1\)"):
            fuse_lora(model, dropout=mode)
    assert not any(hasattr(m, "_peft_forward") for m in model.modules())


@pytest.mark.parametrize("mode", ["seeded", "inmatmul"])
def test_zero_dropout_draws_no_seed_and_no_mask(monkeypatch, mode):
    """lora.dropout = 0: the fused path skips dropout entirely (no seed drawn, no mask, no kernel), in either mode."""
    model = tiny_lora_model(dropout=0.0)
    fuse_lora(model, dropout=mode)
    calls = []
    monkeypatch.setattr(lora_mod, "draw_seed", lambda: calls.append("seed") or 1)
    monkeypatch.setattr(lora_mod, "dropout_mask", lambda *a, **k: calls.append("mask"))
    monkeypatch.setattr(lora_mod, "inmatmul_keep_mask", lambda *a, **k: calls.append("inmatmul mask"))
    monkeypatch.setattr(lora_mod, "_inmatmul_triton", lambda *a, **k: calls.append("inmatmul kernel"))
    monkeypatch.setattr(torch, "native_dropout", lambda *a, **k: calls.append("native"))
    lora_grads(model, batch())
    assert calls == []


@pytest.mark.parametrize("mode", ["seeded", "stored", "inmatmul"])
def test_dropout_masks_survive_recompute_in_every_mode(mode):
    """Under gradient checkpointing the recomputed forward applies the forward's masks, in the engine's seeded
    mode, the in-matmul mode (on CPU its torch reference) and the stored comparison mode (torch's generator, whose
    state checkpointing restores)."""
    inputs = batch(1)
    plain = tiny_lora_model(dropout=0.2)
    fuse_lora(plain, dropout=mode)
    _, grads_plain = lora_grads(plain, inputs, seed=5)
    ckpt = tiny_lora_model(dropout=0.2, checkpointing=True)
    fuse_lora(ckpt, dropout=mode)
    _, grads_ckpt = lora_grads(ckpt, inputs, seed=5)
    for n in grads_plain:
        assert torch.allclose(grads_plain[n], grads_ckpt[n], atol=ATOL), n
    with pytest.raises(ValueError, match="dropout='mask'"):
        fuse_lora(tiny_lora_model(dropout=0.2), dropout="mask")


def test_dropout_masks_survive_recompute_and_apply():
    inputs = batch(1)
    plain = tiny_lora_model(dropout=0.2)
    fuse_lora(plain)
    _, grads_plain = lora_grads(plain, inputs, seed=5)
    ckpt = tiny_lora_model(dropout=0.2, checkpointing=True)
    fuse_lora(ckpt)
    _, grads_ckpt = lora_grads(ckpt, inputs, seed=5)
    for n in grads_plain:  # recompute regenerated the forward's seeds and masks
        assert torch.allclose(grads_plain[n], grads_ckpt[n], atol=ATOL), n
    nodrop = tiny_lora_model(dropout=0.0)
    fuse_lora(nodrop)
    _, grads_nodrop = lora_grads(nodrop, inputs, seed=5)
    assert any(not torch.allclose(grads_plain[n], grads_nodrop[n], atol=1e-3) for n in grads_plain)
    plain.eval()  # eval: no dropout, PEFT's exact function
    with torch.no_grad():
        torch.manual_seed(9)
        a = plain(**inputs).logits
        unfuse_lora(plain)
        b = plain(**inputs).logits
    assert torch.allclose(a, b, atol=ATOL)


def test_fused_engine_loss_parity_with_the_seed_engine_and_a_normal_adapter(tiny_cfg, tiny_tok, shared_artifacts, tmp_path):
    from peft import PeftModel

    from helpers import randomize_lora_b
    from tasks.engine.build import build_model
    from tasks.engine.collate import collator_for
    from tasks.models import load_base_model, resolve_model

    lora = tiny_cfg.lora.model_copy(update={"dropout": 0.0})
    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    g = torch.Generator().manual_seed(3)
    vocab = min(len(tiny_tok), 1000)
    rows = []
    for n in [40, 17, 33, 8, 25, 40, 12, 29, 36, 5, 21, 30, 14, 38, 9, 27]:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    micro_batches = [rows[i:i + 4] for i in range(0, len(rows), 4)]

    losses = {}
    models = {}
    for engine in ("padded", "fused"):
        torch.manual_seed(0)
        model = randomize_lora_b(build_model(ref, tiny_cfg.model, tiny_cfg.quant, lora, True, "cpu", engine))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        collate = collator_for(engine, tiny_tok.pad_token_id)
        losses[engine] = []
        for mb in micro_batches:
            inputs = collate(mb)
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[engine].append(loss.item())
        models[engine] = model
    assert "input_ids" in collator_for("fused", 0)(micro_batches[0]) and collator_for("fused", 0)(micro_batches[0])["input_ids"].shape[0] == 1
    for a, b in zip(losses["padded"], losses["fused"]):
        assert abs(a - b) / abs(a) < 1e-3, (losses["padded"], losses["fused"])
    assert losses["fused"][-1] != losses["fused"][0]  # it trained

    fused = models["fused"].eval()
    fused.save_pretrained(str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    base = load_base_model(ref, tiny_cfg.model, tiny_cfg.quant, "cpu")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton dropout runs on CUDA only")
def test_cuda_seeded_dropout_regenerates_its_mask_and_lora_a_matches_the_formula():
    """On the GPU (bench call): the Triton kernel's mask depends on the seed only, and LoraA's backward
    regenerates it (the mask is read back by dropping a tensor of ones)."""
    p, seed = 0.1, 77
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(48, 512, device="cuda", requires_grad=True)
    ones = torch.ones(4096, 512, device="cuda", dtype=torch.bfloat16)
    keep = seeded_dropout(ones, p, seed) != 0
    assert dropout_backend("cuda") in ("triton", "torch")
    assert torch.equal(keep, seeded_dropout(ones, p, seed) != 0) and not torch.equal(keep, seeded_dropout(ones, p, seed + 1) != 0)
    assert abs((1 - keep.float().mean().item()) - p) < 0.01
    out = LoraA.apply(x, a, p, seed, torch.bfloat16)
    g = torch.randn_like(out)
    out.backward(g)
    ref, ref_gx, ref_ga = _lora_a_reference(x, a, keep, p, g)
    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-1)
    assert torch.allclose(x.grad.float(), ref_gx, rtol=2e-2, atol=2e-1)
    assert torch.allclose(a.grad, ref_ga, rtol=2e-2, atol=2.0)
    y = torch.randn(3 * 4096 + 5, device="cuda", dtype=torch.bfloat16)  # a partial last block; in place = out of place
    ref = seeded_dropout(y, p, seed)
    assert torch.equal(seeded_dropout(y.clone(), p, seed, inplace=True), ref)
    big = seeded_dropout(torch.ones(2**22, device="cuda", dtype=torch.bfloat16), 0.05, 3) == 0
    assert abs(big.float().mean().item() - keep_threshold(0.05) / 65536) < 1e-3


def test_fused_model_under_bf16_autocast_matches_peft():
    """bf16 autocast (how Trainer runs with bf16=True): the LoRA matmuls run in autocast's dtype, as PEFT's do."""
    model = tiny_lora_model(dropout=0.0)
    inputs = batch(2)

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)
        out.loss.backward()
        return out.loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = run()
    fuse_lora(model)
    loss, grads = run()
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 1e-2
    for n in grads:
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), grads_ref[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos.item())
