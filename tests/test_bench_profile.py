"""bench/profile_gpu.py on a hand-built trace in torch.profiler's chrome-trace schema (kernels point at the CPU
op that launched them through "External id"; ops carry "Input Dims"): categories, idle gaps, the table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.profile_gpu import breakdown, load_trace, markdown  # noqa: E402


def op(ext, name, dims, ts=0):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": 1, "args": {"External id": ext, "Input Dims": dims}}


def kernel(ext, name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"External id": ext}}


def trace():
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "qlora_step", "ts": 1000, "dur": 1000},
        op(1, "aten::mm", [[8192, 4096], [4096, 4096]]),       # base projection
        op(2, "aten::mm", [[8192, 4096], [4096, 48]]),          # q/k/v LoRA-A, 3 x r16
        op(3, "aten::add", [[1, 8192, 4096], [1, 8192, 4096]]),  # PEFT's result + lora
        op(4, "aten::mul", [[1, 8192, 4096], []]),               # * scaling
        op(5, "aten::native_dropout", [[1, 8192, 4096], [], []]),
        op(6, "aten::mm", [[8192, 4096], [4096, 32000]]),        # LM head
        op(7, "aten::clone", [[1, 8192, 4096]]),
        kernel(1, "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", 1000, 400),
        kernel(2, "sm90_xmma_gemm_bf16bf16_bf16f32", 1400, 50),
        kernel(3, "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::BFloat16>>", 1450, 60),
        kernel(4, "void at::native::vectorized_elementwise_kernel<4, AUnaryFunctor<mul>>", 1510, 30),
        kernel(5, "void at::native::fused_dropout_kernel_vec<c10::BFloat16>", 1545, 55),  # 5 us launch gap before
        kernel(6, "nvjet_hsh_128x256", 1600, 100),
        kernel(None, "kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", 1700, 20),
        kernel(None, "_rms_norm_forward_kernel", 1720, 10),
        kernel(7, "void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", 1730, 20),
        kernel(None, "flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", 1750, 50),
        kernel(None, "void kOptimizer32bit2State<__nv_bfloat16>", 1900, 90),  # 100 us host stall before
        kernel(None, "Memcpy HtoD (Pageable -> Device)", 1990, 5, cat="gpu_memcpy"),
        kernel(3, "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", 1995, 5),  # training.compile's RMSNorm, one kernel
        kernel(None, "outside_the_step", 5000, 100),
    ]
    return {"traceEvents": ev}


def test_breakdown_attributes_kernels_and_measures_idle(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace()))
    r = breakdown(load_trace(path), max_rank=16)
    c = {k: v["ms"] * 1000 for k, v in r["categories"].items()}  # back to microseconds
    assert c == pytest.approx({"base matmul": 400, "LoRA matmul": 50, "add": 60, "mul / scale": 30, "dropout / RNG": 55,
                               "lm head + loss": 100, "bnb dequantize": 20, "Liger (Triton)": 10, "copies / casts": 25,
                               "attention": 50, "optimizer": 90, "compiled (inductor)": 5})
    assert r["step_ms"] == 1.0 and r["kernels"] == 13  # the kernel after the step is outside the window
    assert r["idle_ms"] * 1000 == pytest.approx(5 + 100)  # the launch gap, the stall (the compiled kernel fills the tail)
    assert r["idle_small_gaps_ms"] * 1000 == pytest.approx(5) and r["idle_large_gaps_ms"] * 1000 == pytest.approx(100)
    assert r["top_kernels"][0]["category"] == "base matmul"
    table = markdown({"fast-full": r})
    assert "| base matmul | 40.0% (0 ms) |" in table and "idle" in table


def test_breakdown_refuses_a_trace_without_gpu_kernels():
    with pytest.raises(ValueError, match="no GPU kernels"):
        breakdown({"traceEvents": [op(1, "aten::mm", [[2, 2], [2, 2]])]})


def test_long_gaps_split_into_host_bound_and_waits_with_the_ops_and_syncs_behind_them():
    """A kernel launched after the GPU went idle is a host-bound stall, named by the op that launched it and the
    Python-level range around it; a kernel queued long before its gap waited on something else (a sync here)."""
    def launch(corr, ts, dur=5, tid=2, name="cudaLaunchKernel", cat="cuda_runtime"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": {"correlation": corr}}

    def k(corr, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "qlora_step", "ts": 1000, "dur": 400, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "autograd::engine::evaluate_function: LoraABackward", "ts": 1140, "dur": 50, "tid": 2},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1145, "dur": 20, "tid": 2},
        launch(1, 900), k(1, 1000, 100),
        launch(2, 1150, name="cuLaunchKernelEx", cat="cuda_driver"), k(2, 1200, 100),  # launched after the GPU went idle at 1100
        launch(3, 1010), k(3, 1400 - 50, 50),  # queued at 1010, GPU idle 1300-1350: not the host's launch
        launch(None, 1305, dur=40, tid=1, name="cudaStreamSynchronize"),
    ]
    r = breakdown({"traceEvents": ev})
    h = r["host"]
    assert h["host_bound_gaps_ms"] * 1000 == pytest.approx(100) and h["other_long_gaps_ms"] * 1000 == pytest.approx(50)
    assert h["syncs"] == {"cudaStreamSynchronize": {"count": 1, "ms": 0.04}}
    assert h["stall_ops"] == [{"op": "aten::mm", "context": "autograd::engine::evaluate_function: LoraABackward", "ms": 0.1, "count": 1}]
    assert "host-bound" in markdown({"run": r}) and "cudaStreamSynchronize ×1" in markdown({"run": r})
