"""The synthetic QLoRA workload that bench/gpu_bench.py and bench/unsloth_bench.py both train, in one place so the
two scripts measure the same thing: model shapes, batch geometry, the two data sets, the LoRA settings, the
random-weight checkpoint and its word-level tokenizer, and the versions line of a results file.

Importing this module imports numpy alone. bench/unsloth_bench.py reads it before `import unsloth`, which must come
before transformers, trl and peft in its process (Unsloth patches them as they load); anything heavier is imported
inside the function that needs it, which that script calls only after `import unsloth`.
"""

from __future__ import annotations

import gc
import math
import platform
import time
from pathlib import Path

import numpy as np

GIB = 2**30
CAP_GIB = 15.0  # allocator cap that stands for a 16 GiB card
MICRO, ACCUM, MAX_LEN = 4, 4, 2048
OPTIM = "paged_adamw_8bit"  # the seed's; --optim adamw_torch_fused for issue 19.1's one-kernel step
WORKDIR = "/tmp/bench_model"  # where the random checkpoint is written once per machine, read by both scripts
# Mistral-7B-v0.1's shapes (config.json of the hub repo).
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  sliding_window=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, hidden_act="silu", initializer_range=0.02)
# Llama-3.1-8B's (issue 19.4): 8 KV heads too, but a 128,256-token vocabulary (the LM head and the loss become a real
# share of the step) and rope scaling; architecture llama.
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu",
                   initializer_range=0.02, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
SHAPES = {"mistral-7b": ("mistral", MISTRAL_7B), "llama-3.1-8b": ("llama", LLAMA_31_8B)}
# LoRA of every run: PEFT's LoraConfig(task_type="CAUSAL_LM", **LORA) in gpu_bench, FastLanguageModel.get_peft_model's
# keyword arguments in unsloth_bench.
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
# Packages whose versions a results file records (read from their metadata: nothing is imported for it).
DISTS = ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger-kernel", "triton", "datasets",
         "unsloth", "unsloth_zoo")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- model


def checkpoint_dir(workdir: Path, shapes: str, n_layers: int) -> Path:
    """The random checkpoint's folder: one per shapes and depth, shared by every script that uses `workdir`."""
    return Path(workdir) / f"{shapes}-random-{n_layers}l"


def write_random_checkpoint(n_layers: int, workdir: Path, shapes: str = "mistral-7b") -> Path:
    """Random-weight model of `shapes` (Mistral-7B-v0.1 or Llama-3.1-8B) built in bf16 on the GPU and saved as
    safetensors, unless the folder already holds one (the 32-layer one is ~14.5 GB: written once per machine)."""
    arch, dims = SHAPES[shapes]
    path = checkpoint_dir(workdir, shapes, n_layers)
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.time()
    config = AutoConfig.for_model(arch, **{**dims, "num_hidden_layers": n_layers})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(default)
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    log(f"random bf16 checkpoint written in {time.time() - t:.0f}s: {path}")
    return path


def build_tokenizer(vocab: int):
    """A word-level tokenizer over the model's vocabulary (`<unk>` 0, `<s>` 1, `</s>` 2, then `t3`...): the data are
    token ids already; the trainers only need pad/eos from it, and Unsloth a folder to load it from (save_pretrained)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


# ---------------------------------------------------------------------------------------------- data


def mixed_lengths(n: int, seed: int) -> list[int]:
    """Log-normal lengths, median 500, p95 ~1,700 (sigma = ln(3.4)/1.645), clipped to [16, 2048]."""
    rng = np.random.default_rng(seed)
    x = rng.lognormal(mean=math.log(500), sigma=math.log(1700 / 500) / 1.645, size=n)
    return [int(v) for v in np.clip(np.round(x), 16, MAX_LEN)]


def make_rows(lengths: list[int], seed: int, vocab: int) -> list[dict]:
    """One row per length: random token ids in [3, vocab) (never unk, bos or eos), labels = input_ids."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for n in lengths:
        ids = rng.integers(3, vocab, size=n).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def synthetic_sets(steps: int, seed: int, vocab: int) -> tuple[dict, dict]:
    """The "full" and "mixed" sets for `steps` optimizer steps. full: exactly the MICRO x ACCUM x steps rows of
    MAX_LEN tokens that padded micro-batches of MICRO rows read. mixed: log-normal lengths, enough rows for either
    batching (micro-batches of MICRO rows, or packs of up to MICRO x MAX_LEN tokens); its `lengths` ride along."""
    full = {"name": "full", "rows": make_rows([MAX_LEN] * (MICRO * ACCUM * steps), seed, vocab)}
    lengths = mixed_lengths(max(2000, 60 * ACCUM * steps), seed)
    mixed = {"name": "mixed", "rows": make_rows(lengths, seed, vocab), "lengths": lengths}
    return full, mixed


def mixed_stats(lengths: list[int]) -> dict:
    return {"n": len(lengths), "median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
            "mean": float(np.mean(lengths))}


# ---------------------------------------------------------------------------------------------- record


def versions() -> dict:
    """Python, torch, CUDA, the GPU and the packages in DISTS ("missing" where absent). Reads package metadata only,
    so it never imports Unsloth into a process that has transformers loaded already."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0), "gpu_mem_gib": torch.cuda.get_device_properties(0).total_memory / GIB}
    for dist in DISTS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


def trainer_classes(base: str = "sft"):
    """TRL's SFTTrainer with a sequential sampler (every run reads the same rows in the same order: parity on equal
    batches) and real-token counting, and the step timer both benches time with. Imported when called, not with this
    module: in unsloth_bench that is after `import unsloth`, so the base class is Unsloth's patched one.

    `base="plain"`: the same on transformers' Trainer with stage 4's bookkeeping (tasks/engine/build.py
    `bookkeeping_trainer`), the loop stage 4 runs (tasks/train.py): no TRL fused LM head (the
    model's own loss: Liger's fused linear cross-entropy on the fast engines), no per-micro-batch entropy/accuracy
    metrics and their `.item()`s; the caller wraps the model in PEFT itself (Trainer takes no peft_config)."""
    import torch
    from transformers import Trainer, TrainerCallback

    if base == "sft":
        from trl import SFTTrainer as Base
    elif base == "plain":  # stage 4's Trainer as tasks/train.py builds it (its bookkeeping on the host)
        from tasks.engine.build import bookkeeping_trainer

        Base = bookkeeping_trainer(Trainer)
    else:
        raise ValueError(f"trainer_classes: base={base!r} is not 'sft' or 'plain'")

    class BenchTrainer(Base):
        real_tokens = 0
        slots = 0

        def _get_train_sampler(self, *args, **kwargs):  # the same order for every engine and bench
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            self.real_tokens += mask.sum() if mask is not None else inputs["input_ids"].numel()
            self.slots += inputs["input_ids"].numel()
            return super().training_step(model, inputs, *args, **kwargs)

    class StepTimer(TrainerCallback):
        """Each optimizer step's seconds, real tokens and slots, and the seconds Python's cyclic garbage collector ran
        inside it (`gc_s`, by generation 0/1/2: a full collection walks every object the model and torch hold)."""

        def __init__(self):
            self.trainer, self.steps = None, []
            self.pauses = GcPauses()

        def on_train_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.t, self.tok, self.slot = time.perf_counter(), 0, 0
            self.pauses.start()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            now, tok, slot = time.perf_counter(), int(self.trainer.real_tokens), int(self.trainer.slots)
            self.steps.append({"s": now - self.t, "tokens": tok - self.tok, "slots": slot - self.slot, "gc_s": [round(x, 4) for x in self.pauses.take()]})
            self.t, self.tok, self.slot = now, tok, slot

        def on_train_end(self, args, state, control, **kwargs):
            self.pauses.stop()

    return BenchTrainer, StepTimer


def collect_every(steps: int):
    """A TrainerCallback that runs a generation-1 collection at the end of every `steps`-th optimizer step: with the
    automatic collector off (`gc.disable()`), what it would have found in the young generations (torchtitan's way)."""
    from transformers import TrainerCallback

    class CollectEvery(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps == 0:
                gc.collect(1)

    return CollectEvery()


class GcPauses:
    """The seconds Python's cyclic garbage collector runs, by generation, between `start()` and `stop()` (a
    `gc.callbacks` hook); `take()` returns them since the last take and starts again from 0. A collection another
    thread runs counts too (the collector holds the GIL, so it delays the step's Python all the same)."""

    def __init__(self):
        self.seconds, self._since = [0.0, 0.0, 0.0], None

    def start(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        if self._hook not in gc.callbacks:
            gc.callbacks.append(self._hook)

    def stop(self) -> None:
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)

    def take(self) -> list[float]:
        out, self.seconds = self.seconds, [0.0, 0.0, 0.0]
        return out

    def _hook(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._since = time.perf_counter()
        elif self._since is not None:
            self.seconds[info["generation"]] += time.perf_counter() - self._since
            self._since = None
