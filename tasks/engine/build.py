"""Builders the probe and the training stage share: engine choice, the LoRA model, the Trainer arguments.

The probe must time exactly what training will run, so both call these (and tasks/engine/collate.py) rather
than keeping copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..config import LoraSection, ModelSection, QuantSection, TrainingSection
from ..models import (ModelRef, compute_dtype, enable_checkpointing, load_base_model, lora_config, lora_targets, peft_quietly, peft_reach,
                      quiet_transformers, softcaps_attention, supports_sdpa, uses_4bit)
from .dist import world, world_size


def engine_for(training: TrainingSection, device: str, recurrent: str | None = None) -> str:
    """The engine that trains: training.engine, or for auto the fused engine on CUDA and the padded one elsewhere — and
    the padded one for a model with layers that carry state along a row (`recurrent`, models.recurrent_layers: packed
    rows would carry one conversation's state into the next; preflight refuses an explicit packed engine for them)."""
    if training.engine != "auto":
        return training.engine
    # fused: measured faster than fast on full and mixed lengths in the same H200 call, with less memory (PERF_NOTES row 19).
    return "fused" if device == "cuda" and not recurrent else "padded"


def optimizer_for(training: TrainingSection, device: str) -> str:
    if training.optimizer != "auto":
        return training.optimizer
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


def keyed_training(training: TrainingSection, device: str | None, exclude: set[str]) -> dict:
    """The training section (less `exclude`) as the cache keys hold it, each value that `auto` resolves to on `device`
    cheaply and always alike written as `auto` resolves it: an explicit optimizer or engine equal to what auto picks
    is `auto`, `gpus: auto` is the count it trains on (1 on the CPU). The engine only on the CPU: on CUDA auto depends
    on the model's layers (`engine_for`'s `recurrent`, from its config), so an explicit `fused` stays as written.
    `device` None (not known): as written."""
    out = training.model_dump(mode="json", exclude=exclude)
    if device is None:
        return out
    auto = training.model_copy(update={"optimizer": "auto", "engine": "auto"})
    if out.get("optimizer", "auto") != "auto" and training.optimizer == optimizer_for(auto, device):
        out["optimizer"] = "auto"
    if device == "cpu" and out.get("engine", "auto") != "auto" and training.engine == engine_for(auto, device):
        out["engine"] = "auto"
    if out.get("gpus") == "auto":
        out["gpus"] = world_size("auto", device)
    return out


def build_model(ref: ModelRef, model_cfg: ModelSection, quant: QuantSection, lora: LoraSection, gradient_checkpointing: bool, device: str, engine: str,
                liger: bool = True, offload: bool = False, compile_layers: bool = False, batch_shape: tuple[int, int] | None = None,
                log_fn=None):
    """Base model (4-bit where QLoRA applies) + LoRA adapters, ready to train. `model.lora_targets` says what LoRA
    reaches (tasks/models.py `lora_targets`). `offload`: the checkpointed layers' inputs wait in host memory
    (recompute.offload_checkpoints, around the decoder stack's forward; the probe decides, tasks/probe.py). GPU only.
    `compile_layers` (training.compile: layers): each decoder layer compiled, and all of its compiles run here on
    synthetic micro-batches of `batch_shape` (micro-batch, max length) and its variants, so they count as load time and
    training compiles nothing; a compiler that fails is one line in `log_fn` and the layers stay eager
    (tasks/engine/compile.py). `model.layer_compile` says what happened (None when not asked)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    fast = engine in ("fast", "fused")  # fused = fast + the fused LoRA path (tasks/engine/lora.py)
    attn = None
    if fast:
        from .fastpath import fast_attn_implementation, register_varlen_attention

        attn = fast_attn_implementation(device)
        if attn == "sdpa" and not supports_sdpa(ref, model_cfg):
            # GPT-OSS off CUDA: transformers refuses sdpa for its sinks; the registered varlen attention computes them in
            # every batch form (a packed row per sample, padded batches, decoding).
            attn = register_varlen_attention()
        if softcaps_attention(ref, model_cfg):
            # Gemma-2 caps attention logits, which neither flash varlen nor sdpa does: eager attention (transformers
            # builds block-diagonal masks from the packed position ids), as transformers recommends for it.
            attn = "eager"
    with quiet_transformers():
        model = load_base_model(ref, model_cfg, quant, device, attn_implementation=attn)
    targets = lora_targets(model, lora)
    # Training builds no KV cache, in the text model's config too: a multimodal model (Gemma-3 4B/12B) reads `use_cache`
    # from its text config, which the top-level flag does not reach, and without checkpointing (which turns it off) its
    # text model built a DynamicCache in every padded training forward, each decoder layer taking the cache path
    # (with training.compile: layers, transformers' eager forward: nothing compiled).
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.use_cache = False
    if uses_4bit(quant, device) and not fast and targets.parameters:
        prepare_kbit_keeping_experts(model, gradient_checkpointing)
    elif uses_4bit(quant, device) and not fast:
        # The seed recipe: PEFT's k-bit prep (also upcasts norms/embeddings/lm_head to fp32).
        with peft_quietly():
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    elif gradient_checkpointing:
        # The fast engine keeps norms and lm_head in bf16 (Liger's fused cross-entropy reads the bf16
        # lm_head; the fp32 upcast costs ~0.5 GB on a 7B model for no measured gain).
        enable_checkpointing(model, {"use_reentrant": False})
        model.enable_input_require_grads()
    if fast:
        from .fastpath import prepare_fast_model

        model = prepare_fast_model(model, use_liger=liger)
    with peft_quietly():
        model = get_peft_model(model, lora_config(lora, targets))
    model.lora_targets = peft_reach(model, targets)  # what PEFT wrapped: the record and the model card say that
    if engine == "fused":
        from .lora import fuse_lora

        fuse_lora(model)
    if offload:
        from .recompute import offload_checkpoints

        offload_checkpoints(model)
    model.layer_compile = None
    if compile_layers:
        from .collate import collator_for, is_padding_free
        from .compile import compile_for_training, warmup_batches

        micro_batch, max_length = batch_shape or (1, 256)
        config = model.get_base_model().config
        collator = collator_for(engine, 0, model, (micro_batch, max_length))
        batches = warmup_batches(collator, micro_batch, max_length, config.vocab_size, padded=not is_padding_free(engine))
        compile_for_training(model, batches, device, autocast_dtype(quant, device), log_fn)
    return model


def autocast_dtype(quant: QuantSection, device: str):
    """The dtype Trainer's mixed precision autocasts the forward to (`training_args`' bf16/fp16), or None (no autocast:
    the CPU, or fp32 compute)."""
    import torch

    dtype = compute_dtype(quant, device)
    return dtype if device == "cuda" and dtype in (torch.bfloat16, torch.float16) else None


def prepare_kbit_keeping_experts(model, gradient_checkpointing: bool) -> None:
    """PEFT's k-bit prep (`prepare_model_for_kbit_training`: base frozen, 16-bit weights upcast to fp32, checkpointing)
    for a mixture-of-experts model, whose routed experts' 3-D weights stay as loaded: bitsandbytes leaves them 16-bit,
    and PEFT's upcast would double them (54 GiB of bf16 experts on Qwen3-30B-A3B -> 108 GiB of fp32)."""
    import torch

    for p in model.parameters():
        p.requires_grad = False
        if p.dtype in (torch.float16, torch.bfloat16) and p.ndim != 3 and type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)
    if gradient_checkpointing:
        enable_checkpointing(model, {"use_reentrant": False})
        model.enable_input_require_grads()


@contextlib.contextmanager
def collector_kept_off_the_model() -> Iterator[None]:
    """Python's cyclic garbage collector kept off every object alive when training starts (the model, its LoRA modules,
    the libraries'): a full collection walks all of them, and one in a step cost 0.29-0.34 s of a 3.15 s step on the
    Mistral-7B bench (one H100; none over 3.171 s with them frozen: docs/BENCHMARKS.md "the collector kept off the
    model"). On exit, however training ends, they are back in its reach, so the model's own cycles are freed once the
    stage drops it. Where a freeze is already made (`qlora-pipeline run`'s, tests/conftest.py's: the imports, the bulk of
    what a collection walks), it is left as it is: unfreezing is all or nothing, and a freeze lost on an exception would
    stay lost for the process (a review of d6993f8). The probe times its steps under it too (tasks/probe.py), as stage 4
    runs them."""
    import gc

    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def drop_log_dicts(trainer, bar=None) -> None:
    """Trainer prints every log dict (`{'loss': ..., 'grad_norm': ...}`) over its progress bar, or as a bare line when
    the bar is off, in between the project's log lines; stage 4 already logs each step as one line of ours (BudgetGuard)
    and keeps every dict in log_history.json. Keep a bar (`bar`, a ProgressCallback-like callback; default Trainer's own
    with its ETA), drop the dicts. Where Trainer shows no bar (not the main process, `disable_tqdm`) none is added."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarWithoutDicts(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(bar if bar is not None else BarWithoutDicts())
    trainer.pop_callback(PrinterCallback)


NON_PADDING_TOKENS = "_non_padding_tokens"  # the batch's key for its count of non-padding tokens (CountNonPadding)


class CountNonPadding:
    """Wraps a collator: each batch also carries its count of non-padding tokens (its attention_mask's sum) as a host
    integer, made here while the mask is still on the host; the Trainer's dataloader then moves the batch to the GPU,
    where the same sum would be a read-back (bookkeeping_trainer). A batch without a host attention_mask is left as it is."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask") if hasattr(batch, "get") else None
        if mask is not None and getattr(mask, "device", None) is not None and mask.device.type == "cpu":
            batch[NON_PADDING_TOKENS] = int(mask.sum())
        return batch


def bookkeeping_trainer(base=None):
    """`base` (default transformers' Trainer) with its per-micro-batch bookkeeping made on the host (issue 19, the
    Trainer's share of a step). transformers' `_track_num_input_tokens` turns each micro-batch's token count into a
    device tensor, gathers it and `.item()`s it after the backward — a host-device sync that drains the CUDA queue, so
    the next forward's launches start from an idle GPU. On one process the count is added as a host integer instead:
    with `include_num_input_tokens_seen="all"` (stage 4 and the probe on packed rows) the row's size; with
    "non_padding" (the padded engine) the attention_mask's sum, counted by the collator before the batch leaves the
    host (CountNonPadding; `_prepare_inputs` drops the count, so the model never sees it). Several ranks keep
    transformers' gather (the ranks' batches differ). `floating_point_ops` (the `total_flos` of the logs) walks every
    parameter per micro-batch (~7 ms of host time on 32 layers, measured on CPU): the count of non-embedding
    parameters is read once; it does not change during training. The numbers are the same as transformers'."""
    if base is None:
        from transformers import Trainer as base

    class BookkeepingTrainer(base):
        _parameters_for_flops: int | None = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if (self.args.include_num_input_tokens_seen == "non_padding" and self.args.world_size == 1
                    and self.data_collator is not None):
                self.data_collator = CountNonPadding(self.data_collator)

        def _prepare_inputs(self, inputs):
            if NON_PADDING_TOKENS in inputs:
                inputs = {k: v for k, v in inputs.items() if k != NON_PADDING_TOKENS}
            return super()._prepare_inputs(inputs)

        def _track_num_input_tokens(self, inputs):
            name = getattr(self.model, "main_input_name", "input_ids")
            if self.args.world_size == 1 and name in inputs:
                if self.args.include_num_input_tokens_seen == "all":
                    self.state.num_input_tokens_seen += int(inputs[name].numel())
                    return
                if self.args.include_num_input_tokens_seen == "non_padding" and NON_PADDING_TOKENS in inputs:
                    self.state.num_input_tokens_seen += inputs[NON_PADDING_TOKENS]
                    return
            return super()._track_num_input_tokens(inputs)

        def floating_point_ops(self, inputs):
            name = getattr(self.model, "main_input_name", "input_ids")
            if name not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._parameters_for_flops is None:
                self._parameters_for_flops = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[name].numel() * self._parameters_for_flops

    return BookkeepingTrainer


def checkpointing_arg() -> str:
    """TrainingArguments' name for activation checkpointing: `activation_checkpointing` where transformers has it (the old
    `gradient_checkpointing` warns there and goes in v6), `gradient_checkpointing` before (5.17)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def training_args(training: TrainingSection, output_dir: Path, device: str, quant: QuantSection, *, micro_batch_size: int, grad_accum: int, max_steps: int, gradient_checkpointing: bool, keep: int | None = None, padding_free: bool = False):
    import torch
    from transformers import TrainingArguments

    dtype = autocast_dtype(quant, device)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=max(int(round(training.warmup_ratio * max_steps)), 0),
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        max_steps=max_steps,
        optim=optimizer_for(training, device),
        bf16=dtype == torch.bfloat16,  # autocast_dtype: also what a compiled layer's warm-up runs under
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        **{checkpointing_arg(): False},  # already enabled on the model (PEFT needs it set up before wrapping)
        logging_steps=training.logging_steps,
        save_strategy="no",  # BudgetGuard decides when to save (every N minutes, and at the end)
        save_total_limit=keep,
        save_only_model=False,
        report_to="none",
        logging_nan_inf_filter=False,  # the default logs a NaN/inf step as the window's average: BudgetGuard must see it
        seed=training.seed,
        data_seed=training.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # Padding-free rows have no padding to exclude (and no attention_mask to find it by).
        include_num_input_tokens_seen="all" if micro_batch_size == 1 and padding_free else "non_padding",
        # Several ranks: rank 0's per-step log line is the progress (bars from N processes interleave).
        disable_tqdm=world() > 1,
        # Every LoRA weight gets a gradient each step: skip DDP's search for unused ones (a graph walk per step).
        ddp_find_unused_parameters=False,
    )
    # One process drives one GPU. On a multi-GPU host Trainer's legacy single-process mode multiplies the batch
    # by the visible GPU count (for nn.DataParallel, which it then skips for 4-bit models): one GPU would get
    # twice the batch and memory. Several GPUs go through torchrun (training.gpus), one process each.
    _ = args.device
    args._n_gpu = min(args._n_gpu, 1)
    return args
