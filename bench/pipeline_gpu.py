"""The pipeline's own stages on a GPU: data -> probe -> train with a short time budget, Mistral-7B shapes.

Runs the real stage functions (not the benchmark harness) on the random-weight Mistral-7B-v0.1
architecture (exact shapes: hidden 4096, 32 layers, GQA 8 KV heads, vocab 32000) with the seed's QLoRA
recipe, on a synthetic mixed-length chat set (log-normal lengths, median ~500 tokens, capped at 2048), and
reports s/step, tokens/s, peak GB and the training stage's budget error. Prefect is not needed.

    python bench/pipeline_gpu.py --engine fast --minutes 3 --out results.json
    python bench/pipeline_gpu.py --gpus 1,2 --minutes 1.5 --out multi.json   # issue 8: 1 then 2 GPUs, same data
    python bench/pipeline_gpu.py --engine fused --vram-gb 15 --minutes 1.5 --set training.compile=layers --out c.json  # issue 19
    python bench/pipeline_gpu.py --engine fused --vram-gb 15 --minutes 3 --loss-read each-step,deferred --out ab.json  # the probe gap

With `--loss-read each-step,deferred` one probe serves a training stage per mode (tasks/train.py LOSS_READ), run in
that order on the same data, each from step 0. Every stage run reports its steps' times (the guard's clock at each
step's end: mean, median, p10/p90, and the probe's own estimator over them beside the probe's timed steps), a host-time
ledger (what the stage's step does besides the model, in ms a step: the optimizer step with bitsandbytes' syncs, the
loss read, the guard, TensorBoard, the log line, fetching and collating the next micro-batches) and, where nvidia-smi
answers, the GPU's clocks, power and temperature during the probe and each stage (docs/PERF_NOTES.md "The stage's gap
to its probe").

With `--gpus 1,2` it runs the probe + training stage once per GPU count (training.gpus=N: N > 1 goes through
torchrun, tasks/engine/launch.py) on the same data and model, and adds the scaling (tokens/s with N GPUs over 1) and
the loss parity: the same global batch (micro x accum) sees the same packs at step k whatever N is, so step 1's
loss must agree to bf16 noise; later steps drift apart slowly because the LR schedule runs on time, and N
GPUs reach step k sooner.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

MISTRAL_7B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 10000.0,
    "sliding_window": 4096, "dtype": "bfloat16",
}
WORDS = "apple river stone cloud garden window candle pencil forest bridge silver orange rabbit castle summer".split()


def mixed_chats(path: Path, n: int, seed: int = 0) -> None:
    """Conversations whose token counts follow a log-normal (median ~500, p95 ~1,700), as real SFT data does."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            tokens = min(int(math.exp(rng.gauss(math.log(500), 0.75))), 2000)
            words = max(tokens // 2, 4)  # the byte-level BPE averages ~2 tokens per word here
            q = " ".join(rng.choice(WORDS) for _ in range(max(words // 4, 2)))
            a = " ".join(rng.choice(WORDS) for _ in range(max(words - words // 4, 2)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="fast", choices=["fast", "fused", "padded"])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--vram-gb", type=float, default=None)
    ap.add_argument("--artifacts", default="/tmp/qlp-artifacts")
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts to run in turn, e.g. 1,2")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the Mistral-7B shapes (fewer: a quicker smoke run)")
    ap.add_argument("--out", default="pipeline_gpu.json")
    ap.add_argument("--loss-read", default="each-step",
                    help="comma-separated tasks/train.py LOSS_READ modes, one training stage each on the same probe: each-step (the default), deferred")
    ap.add_argument("--no-ledger", dest="ledger", action="store_false", help="leave out the host-time ledger (its timers' own cost)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides, after the bench's own (issue 19: training.compile=layers, "
                         "training.offload_activations=auto, training.optimizer=adamw_torch_fused)")
    args = ap.parse_args()
    from tasks.train import LOSS_READS

    args.loss_reads = [m.strip() for m in args.loss_read.split(",") if m.strip()]
    bad = [m for m in args.loss_reads if m not in LOSS_READS]
    if bad or not args.loss_reads:
        ap.error(f"--loss-read {args.loss_read!r}: modes are {', '.join(LOSS_READS)} (comma-separated)")
    counts = [int(g) for g in args.gpus.split(",")]
    if "deferred" in args.loss_reads and max(counts) > 1:
        # several GPUs train through torchrun: its ranks import tasks.train afresh (LOSS_READ each-step, and the deferred
        # read is one process only), so a 'deferred' result would be an each-step run under another label
        ap.error(f"--loss-read {args.loss_read!r} with --gpus {args.gpus}: the deferred read runs on one process only; "
                 "time it with --gpus 1")

    data_path = Path(args.artifacts) / "mixed.jsonl"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    mixed_chats(data_path, 3000)
    overrides = [
        "model.name=random:mistral",
        "model.random_config=" + json.dumps({**MISTRAL_7B, "num_hidden_layers": args.layers}),
        f"data.source={data_path}",
        "data.heldout_size=50",
        f"training.engine={args.engine}",
        "training.checkpoint_minutes=1.5",
        f"artifacts_dir={args.artifacts}",
    ]
    # No --vram-gb: one probe trial at the recipe's setting (4 x 4, all layers checkpointed). --vram-gb N: the search
    # (largest micro-batch that fits checkpointed, then as many layers without recompute as fit; tasks/probe.py).
    overrides.append(f"budget.vram_gb={args.vram_gb or 'null'}")
    overrides += args.extra
    log = lambda m: print(m, flush=True)  # noqa: E731
    results = []
    for n in counts:
        results.append(run_once(overrides + [f"training.gpus={n}"], args, log))
        out = results[0] if len(results) == 1 and len(counts) == 1 else {"runs": results, **compare(results)}
        Path(args.out).write_text(json.dumps(out, indent=1))  # after each run: a timeout keeps what finished
    print(json.dumps(out, indent=1), flush=True)
    if len(results) > 1:
        print("\n| GPUs | card | probe s/step | steps | wall / budget | budget error | tokens/s (excl. load) | per GPU | x 1 GPU | first loss | final loss |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['gpus']} | {r['card']} | {r['probe_s_per_step']:.2f} | {r['steps']} ({r['expected_steps']}) | {r['wall_s']:.1f} / {r['budget_s']:.0f} s | "
                  f"{r['budget_error']:+.2%} | {r['train_tokens_per_s_excl_load']:,} | {r['train_tokens_per_s_excl_load'] / r['gpus']:,.0f} | "
                  f"{r['train_tokens_per_s_excl_load'] / results[0]['train_tokens_per_s_excl_load']:.2f} | {r['first_loss']:.4f} | {r['final_loss']:.4f} |")
        print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)


def run_once(overrides: list[str], args, log) -> dict:
    """Data, probe, then one training stage per --loss-read mode on that probe; the first mode's numbers at the top
    level (as before the flag), every mode's under "by_loss_read"."""
    import shutil

    from tasks.config import load_config
    from tasks.data import load_dataset_records
    from tasks.probe import probe_throughput

    cfg = load_config(profile="mistral-7b", overrides=overrides, minutes=args.minutes)
    n = cfg.training.gpus
    clocks = GpuClocks()
    t = time.monotonic()
    data = load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    log(f"data: {data.n_train} train rows, {data.train_tokens:,} tokens, dropped {data.dropped} in {time.monotonic() - t:.0f}s (includes building the random 7B)")
    t = time.monotonic()
    with clocks.phase("probe"):
        probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, cfg.device, cfg.artifacts_dir, log)
    log(f"probe ({n} GPU): {probe.micro_batch_size} x {probe.grad_accum}, {probe.recompute_free_layers} layers without recompute, {probe.s_per_step:.2f} s/step, {probe.tokens_per_s:,.0f} tok/s, peak {probe.peak_mem_gb:.2f} GB, "
        f"load {probe.load_seconds:.0f}s, launch {probe.launch_seconds:.0f}s, first step +{probe.first_step_excess_seconds:.1f}s, checkpoint {probe.save_seconds:.1f}s, final save {probe.final_save_cost:.1f}s -> {probe.max_steps} steps ({time.monotonic() - t:.0f}s)")
    runs = []
    for i, mode in enumerate(args.loss_reads):
        with clocks.phase(f"train:{mode}"):
            out = train_once(data, probe, cfg, n, mode, args, log)
        if i + 1 < len(args.loss_reads):
            shutil.rmtree(out.pop("dir"), ignore_errors=True)  # the next mode trains from step 0, not from this cache
        else:
            out.pop("dir")
        runs.append(out)
        Path(args.out).write_text(json.dumps({"partial": "the stages run so far", "runs": runs}, indent=1))  # a timeout keeps them
    clocks.stop()
    first = dict(runs[0])
    first["gpu_clocks"] = clocks.summary()
    if len(runs) > 1:
        first["by_loss_read"] = {r["loss_read"]: {k: r[k] for k in AB_KEYS} for r in runs}
        log("\n| loss read | steps | tokens/s (excl. load) | stage s/step mean / median / p90 | probe s/step | ledger ms/step (top 3) |")
        log("|---|---|---|---|---|---|")
        for r in runs:
            ms = {k: v for k, v in r.get("host_ledger_ms_per_step", {}).items() if isinstance(v, (int, float))}
            st, top = r["stage_steps"], sorted(ms.items(), key=lambda kv: -kv[1])[:3]
            log(f"| {r['loss_read']} | {r['steps']} | {r['train_tokens_per_s_excl_load']:,} | {st.get('mean', 0):.3f} / {st.get('median', 0):.3f} / "
                f"{st.get('p90', 0):.3f} | {r['probe_s_per_step']:.3f} | " + ", ".join(f"{k} {v:.1f}" for k, v in top) + " |")
    return first


AB_KEYS = ("steps", "wall_s", "budget_error", "train_tokens_per_s_excl_load", "stage_steps", "host_ledger_ms_per_step", "final_loss",
           "peak_gb_train")


def train_once(data, probe, cfg, n: int, mode: str, args, log) -> dict:
    import gc

    import torch

    import tasks.train as train_mod
    from tasks.probe import step_seconds

    train_mod.LOSS_READ = mode
    torch.cuda.reset_peak_memory_stats()
    ledger = HostLedger() if args.ledger else None
    with StepClock() as steps, (ledger or _nothing()):
        train = train_mod.train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.artifacts_dir, log)
    # One process: this process's peak. Several: the probe's (the largest rank's, same setting).
    peak = torch.cuda.max_memory_allocated() / 2**30 if n == 1 else probe.peak_mem_gb
    tok_s = train.tokens_seen / max(train.wall_seconds - probe.load_seconds - probe.launch_seconds, 1e-9)
    history = json.loads((Path(train.dir) / "log_history.json").read_text())
    chosen = next((t for t in probe.trials if t.get("fits") and t.get("s_per_step") == probe.s_per_step), {})
    stage = steps.summary(skip=2)
    if stage.get("n"):
        stage["probe_estimator"] = round(step_seconds(steps.deltas[2:], "cuda"), 4)  # tasks/probe.py step_seconds on the stage's steps
    if chosen.get("step_times"):
        stage["probe_steps_timed"] = chosen["step_times"]
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "loss_read": mode, "dir": train.dir, "stage_steps": stage,
        **({"host_ledger_ms_per_step": ledger.per_step(max(train.steps - (train.resumed_from_step or 0), 1))} if ledger else {}),
        "gpus": n, "card": torch.cuda.get_device_name(0), "engine": args.engine, "budget_s": train.budget_seconds,
        "wall_s": train.wall_seconds, "budget_error": train.budget_error, "stopped_by": train.stopped_by,
        "steps": train.steps, "expected_steps": train.expected_steps, "tokens_seen": train.tokens_seen,
        "train_tokens_per_s_excl_load": round(tok_s), "train_tokens_per_s_incl_load": round(train.tokens_seen / train.wall_seconds),
        "probe_s_per_step": probe.s_per_step, "probe_tokens_per_s": probe.tokens_per_s, "probe_launch_s": probe.launch_seconds,
        "probe_load_s": probe.load_seconds, "probe_first_step_excess_s": probe.first_step_excess_seconds, "micro_batch_size": probe.micro_batch_size, "grad_accum_per_gpu": probe.grad_accum,
        "recompute_free_layers": probe.recompute_free_layers, "probe_trials": probe.trials, "layers": args.layers,
        "peak_gb_train": round(peak, 2), "trainable": train.trainable_params,
        "first_loss": train.first_loss, "final_loss": train.final_loss,
        "loss_curve": [round(h["loss"], 5) for h in history if "loss" in h],
        "overrides": args.extra, "compile": cfg.training.compile, "offload_activations": cfg.training.offload_activations,
        "optimizer": cfg.training.optimizer,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
    }


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class StepClock:
    """The guard's step ends on this process's clock (tasks/train.py BudgetGuard.on_step_end wrapped): each step's time
    as the stage ran it, the first steps (warm-up) left out of the summary by the caller."""

    def __enter__(self):
        import tasks.train as train_mod

        self.real, self.ends = train_mod.BudgetGuard.on_step_end, []
        real, ends = self.real, self.ends

        def on_step_end(guard, args, state, control, **kw):
            out = real(guard, args, state, control, **kw)
            ends.append(time.monotonic())
            return out

        train_mod.BudgetGuard.on_step_end = on_step_end
        return self

    def __exit__(self, *exc):
        import tasks.train as train_mod

        train_mod.BudgetGuard.on_step_end = self.real
        return False

    @property
    def deltas(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]

    def summary(self, skip: int = 2) -> dict:
        d = sorted(self.deltas[skip:])
        if not d:
            return {"n": 0}
        pick = lambda f: round(d[min(int(f * len(d)), len(d) - 1)], 4)  # noqa: E731
        return {"n": len(d), "from_step": skip + 2, "mean": round(sum(d) / len(d), 4), "median": pick(0.5), "p10": pick(0.1),
                "p90": pick(0.9), "max": round(d[-1], 4)}


_INHERITED = object()


class HostLedger:
    """Host seconds a training stage spends in each piece of its step besides the model's own kernels (wrapped at the
    class level for the stage's run, restored after): the optimizer step (bitsandbytes' paged 8-bit synchronizes the
    device per LoRA tensor: the wait for the backward's tail is in here), torch.cuda.synchronize calls (count and time),
    Tensor.item by device (the dropout seeds on the CPU; the loss, grad-norm and Liger cross-entropy reads on the GPU), the guard's step end (with the heartbeat's hand-off to its thread, counted
    apart too; the thread's write_json with fsync, off the step, and the checkpoint markers'), its log line, TensorBoard's
    on_log (scalars + flush), the bar, Trainer.log, and fetching + collating + copying the next micro-batches."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.undo: list = []

    def _wrap(self, owner, name: str, label) -> None:
        """`label`: the ledger's row, or a function of the call's arguments that names it (Tensor.item by device)."""
        real = getattr(owner, name)
        seconds, calls = self.seconds, self.calls

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                row = label if isinstance(label, str) else label(*a)
                seconds[row] = seconds.get(row, 0.0) + time.perf_counter() - t
                calls[row] = calls.get(row, 0) + 1

        self._set(owner, name, timed)

    def __enter__(self):
        try:
            self._wrap_all()
        except BaseException:
            self.__exit__(None, None, None)  # a failed __enter__ gets no __exit__: put back what was already wrapped
            raise
        return self

    def _wrap_all(self) -> None:
        import torch
        import transformers
        from transformers.integrations import TensorBoardCallback

        import tasks.train as train_mod

        self._wrap(torch.cuda, "synchronize", "cuda.synchronize")
        # by device: a CPU tensor's read (the LoRA dropout seeds, ~930 a step on the 15 GiB stage) never waits; a CUDA
        # one waits for the queue before it (Liger's fused cross-entropy reads one a micro-batch: PERF_NOTES "The 942, located")
        self._wrap(torch.Tensor, "item", lambda t, *a: f"Tensor.item ({t.device.type})")
        self._wrap(train_mod.BudgetGuard, "on_step_end", "guard.on_step_end")
        self._wrap(train_mod.Heartbeat, "beat", "heartbeat.beat (training thread)")
        self._wrap(train_mod, "write_json", "write_json (heartbeat thread, markers)")
        self._wrap(train_mod.BudgetGuard, "on_log", "guard.on_log (log line)")
        self._wrap(train_mod.BudgetBar, "on_step_end", "bar")
        self._wrap(TensorBoardCallback, "on_log", "tensorboard.on_log")
        self._wrap(transformers.Trainer, "log", "Trainer.log (all on_log)")
        self._wrap(transformers.Trainer, "get_batch_samples", "fetch + collate + copy")
        # the optimizer step: between the callbacks Trainer calls around it
        t0 = {}
        seconds, calls = self.seconds, self.calls

        def pre(guard, *a, **kw):
            t0["t"] = time.perf_counter()

        def post(guard, *a, **kw):
            if "t" in t0:
                seconds["optimizer.step"] = seconds.get("optimizer.step", 0.0) + time.perf_counter() - t0.pop("t")
                calls["optimizer.step"] = calls.get("optimizer.step", 0) + 1

        self._set(train_mod.BudgetGuard, "on_pre_optimizer_step", pre)
        self._set(train_mod.BudgetGuard, "on_optimizer_step", post)

    def _set(self, owner, name: str, value) -> None:
        """`owner.name = value`, undone on exit: the attribute put back, or removed where `owner` only inherited it."""
        self.undo.append((owner, name, owner.__dict__.get(name, _INHERITED)))
        setattr(owner, name, value)

    def __exit__(self, *exc):
        for owner, name, real in reversed(self.undo):
            if real is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, real)
        self.undo.clear()
        return False

    def per_step(self, steps: int) -> dict:
        out = {k: round(1000 * v / steps, 2) for k, v in sorted(self.seconds.items())}
        out["calls_per_step"] = {k: round(c / steps, 1) for k, c in sorted(self.calls.items())}
        return out


class GpuClocks:
    """nvidia-smi's SM clock, power, temperature and utilization once a second, in named phases (none where nvidia-smi
    does not answer): whether the stage ran on another clock than the probe's few steps (a card warming under minutes
    of load lowers its clock; a probe right after a load idles it)."""

    QUERY = "clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu"

    def __init__(self, every_s: float = 1.0):
        import shutil
        import threading

        self.samples: list[tuple[str, list[float]]] = []
        self.current = None
        self.stopped = threading.Event()
        self.thread = None
        if shutil.which("nvidia-smi"):
            self.thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
            self.thread.start()

    def _run(self, every_s: float) -> None:
        import subprocess

        while not self.stopped.wait(every_s):
            phase = self.current
            if phase is None:
                continue
            try:
                line = subprocess.run(["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits", "-i", "0"],
                                      capture_output=True, text=True, timeout=5).stdout.strip().splitlines()[0]
                self.samples.append((phase, [float(x) for x in line.split(",")]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                continue

    def phase(self, name: str):
        clocks = self

        class _Phase:
            def __enter__(self):
                clocks.current = name

            def __exit__(self, *exc):
                clocks.current = None
                return False

        return _Phase()

    def stop(self) -> None:
        self.stopped.set()

    def summary(self) -> dict:
        out = {}
        for phase in dict.fromkeys(p for p, _ in self.samples):
            rows = [v for p, v in self.samples if p == phase]
            cols = list(zip(*rows))
            out[phase] = {"samples": len(rows), "sm_mhz_mean": round(sum(cols[0]) / len(rows)), "sm_mhz_min": min(cols[0]),
                          "mem_mhz_mean": round(sum(cols[1]) / len(rows)), "power_w_mean": round(sum(cols[2]) / len(rows), 1),
                          "temp_c_max": max(cols[3]), "util_pct_mean": round(sum(cols[4]) / len(rows), 1)}
        return out


def compare(results: list[dict]) -> dict:
    """Scaling and loss parity of every run against the first (1 GPU)."""
    base = results[0]
    out = {"scaling": {}, "loss_parity": {}}
    for r in results[1:]:
        out["scaling"][f"{r['gpus']}_vs_{base['gpus']}"] = round(r["train_tokens_per_s_excl_load"] / base["train_tokens_per_s_excl_load"], 3)
        k = min(len(r["loss_curve"]), len(base["loss_curve"]))
        rel = [abs(a - b) / abs(b) for a, b in zip(r["loss_curve"][:k], base["loss_curve"][:k])]
        out["loss_parity"][f"{r['gpus']}_vs_{base['gpus']}"] = {
            "step1_rel_diff": round(rel[0], 6) if rel else None,
            "steps_compared": k,
            "max_rel_diff_first5": round(max(rel[:5]), 5) if rel else None,
            "mean_rel_diff_all": round(sum(rel) / k, 5) if k else None,
        }
    return out


if __name__ == "__main__":
    main()
