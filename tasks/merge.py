"""Stage 6 — merge the adapter into a 16/32-bit copy of the base model, and prove it is the same model.

QLoRA trains the adapter against the *dequantized NF4* weights, so that is what we merge into: load the
base exactly as training did, dequantize it (on CPU's plain-LoRA fallback there is nothing to dequantize),
cast to the merge dtype, merge, save safetensors with the tokenizer and chat template. Merging into a
4-bit model instead re-quantizes the sum and degrades it — the peers' complaint; we never do that.

Check: logits of the merged model, reloaded from disk, vs the unmerged dequantized-base + adapter on a few
held-out prompts; max/mean |diff| are recorded and must stay under `merge.tolerance`.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from .common import StageError, building, fingerprint, is_complete, locked, maybe_fault, read_json, stage_dir, write_json
from .config import MergeSection, ModelSection, QuantSection
from .data import DataRecord, load_split
from .models import compute_dtype, load_base_model, load_tokenizer, quiet_transformers, resolve_device, resolve_model, uses_4bit

MERGE_VERSION = 1


class MergeRecord(BaseModel):
    key: str
    dir: str
    merged_dir: str
    dtype: str
    dequantized_from_4bit: bool
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    check_prompts: int
    top1_agreement: float
    seconds: float

    def outputs_exist(self) -> bool:
        return is_complete(Path(self.dir)) and (Path(self.merged_dir) / "config.json").is_file()


def merge_dtype(merge: MergeSection, quant: QuantSection, device: str):
    import torch

    if merge.dtype != "auto":
        return getattr(torch, merge.dtype)
    return compute_dtype(quant, device)


def cache_key(data: DataRecord, train, model: ModelSection, quant: QuantSection, merge: MergeSection) -> str:
    return fingerprint("merge", MERGE_VERSION, train.key, quant.model_dump(mode="json"), merge.model_dump(mode="json"), model.chat_template)


def merge_adapter(data: DataRecord, train, model: ModelSection, quant: QuantSection, merge: MergeSection, device: str, artifacts_dir: str, log_fn=None) -> MergeRecord:
    """Stage 6: merged safetensors model + equivalence check. Merging twice is a no-op (cached by key)."""
    key = cache_key(data, train, model, quant, merge)
    out = stage_dir(artifacts_dir, "merge", key)
    with locked(out):
        if is_complete(out):
            return MergeRecord.model_validate(read_json(out / "record.json"))
        return _merge(data, train, model, quant, merge, resolve_device(device), key, out, artifacts_dir, log_fn or (lambda m: None))


def _merge(data, train, model_cfg, quant, merge, device, key, out, artifacts_dir, log_fn) -> MergeRecord:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    maybe_fault("merge")
    t0 = time.monotonic()
    ref = resolve_model(model_cfg, artifacts_dir)
    tok = load_tokenizer(ref, model_cfg)
    dtype = merge_dtype(merge, quant, device)
    was_4bit = uses_4bit(quant, device)
    with quiet_transformers():
        base = load_base_model(ref, model_cfg, quant, device)
        if was_4bit:
            base = base.dequantize()  # the weights the adapter was trained against
        base = base.to(dtype)
        model = PeftModel.from_pretrained(base, train.adapter_dir).to(dtype)
    model.eval()

    batch = _check_batch(data, merge.check_prompts, tok.pad_token_id, device)
    with torch.inference_mode():
        ref_logits = model(**batch).logits.float()
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    with building(out) as tmp:
        mdir = tmp / "merged"
        merged.save_pretrained(str(mdir), safe_serialization=True)
        tok.save_pretrained(str(mdir))
        del merged, model, base
        with quiet_transformers():
            reloaded = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=dtype, use_safetensors=True).to(device)
        with torch.inference_mode():
            got = reloaded(**batch).logits.float()
        mask = batch["attention_mask"].bool()
        diff = (got - ref_logits).abs()[mask]
        max_d, mean_d = float(diff.max()), float(diff.mean())
        top1 = float((got.argmax(-1) == ref_logits.argmax(-1))[mask].float().mean())
        if max_d > merge.tolerance:
            raise StageError(f"merged model differs from base+adapter by up to {max_d:.4f} (> merge.tolerance={merge.tolerance}); "
                             "raise the tolerance for low-precision merges or set merge.dtype=float32")
        rec = MergeRecord(
            key=key,
            dir=str(out),
            merged_dir=str(out / "merged"),
            dtype=str(dtype).replace("torch.", ""),
            dequantized_from_4bit=was_4bit,
            max_abs_diff=round(max_d, 6),
            mean_abs_diff=round(mean_d, 7),
            tolerance=merge.tolerance,
            check_prompts=int(batch["input_ids"].shape[0]),
            top1_agreement=round(top1, 5),
            seconds=round(time.monotonic() - t0, 2),
        )
        write_json(tmp / "record.json", rec.model_dump(mode="json"))
    log_fn(f"merge: {rec.dtype} safetensors; logits vs base+adapter max |diff| {max_d:.2e}, mean {mean_d:.2e}, top-1 agreement {top1:.2%}")
    return rec


def _check_batch(data: DataRecord, n: int, pad_id: int, device: str) -> dict:
    from .train import PaddedCollator

    held = load_split(data, "heldout")
    batch = PaddedCollator(pad_id)([held[i] for i in range(min(n, len(held)))])
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}
