"""Stage 6 — merge the adapter into the base model in fp32 arithmetic, save it, and prove it is the same model.

Right by construction: the base is loaded exactly as training loaded it (NF4 on a GPU, or plain weights on
the CPU fallback); for every LoRA-wrapped linear layer the weight the adapter was trained against is
dequantized to fp32, PEFT's own delta (`scale * B @ A`, adapters in fp32) is added in fp32, and only the sum
is rounded, once, to the saved dtype. One layer at a time, so a 7B model needs its 4-bit copy on the GPU plus
its merged 16-bit state dict in CPU memory, never a full fp32 copy. Merging into 4-bit weights (re-quantizing
W + ΔW) is never done: it throws away most of a small delta.

Saved dtype (`merge.dtype`): `auto` = the training compute dtype — bf16 for a GPU-trained 7B (half the size
of fp32, the dtype the model ran in while it learned), fp32 on the CPU fallback.

Check: logits of the merged model reloaded from disk (computed in its saved dtype, as it will be served) vs
the unmerged base + adapter (computed as training computed) on held-out prompts. A max-|Δlogit| bound can't
tell a correct bf16 merge (bf16 rounding moves single logits by ~1) from a wrong one, so the check uses
measures that fit the dtype: mean per-token KL(reference ‖ merged), top-1 agreement, mean |Δlogit|, and how
much of the adapter's own effect (KL(reference ‖ base without adapter)) the merge reproduces. Thresholds per
dtype are in `CHECK_LIMITS` (measured: docs/BENCHMARKS.md "Merge check"); a wrong scale, a module left out or
a 4-bit merge fails them (tests/test_merge.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel

from .common import StageError, building, changed_file, complete_record, fingerprint, folder_fingerprint, is_complete, locked, maybe_fault, safetensors_whole, stage_dir, write_json
from .config import MergeSection, ModelSection, QuantSection
from .data import DataRecord, load_split, rendering_key, rows_key
from .models import compute_dtype, keyed_quant, load_base_model, load_tokenizer, model_code_revisions, pinned_from_config, quiet_transformers, remote_code_key, resolve_device, resolve_model, uses_4bit

MERGE_VERSION = 2

# Per precision: (max mean KL in nats per token, min top-1 agreement, max share of the adapter's effect left
# unreproduced). A correct merge differs from base + adapter only by rounding: the merged weights in the saved
# dtype, and each side's arithmetic (the reference runs as training ran, e.g. bf16 on a GPU). So the limits are
# those of the coarser of the two precisions: an fp32 merge of a bf16-trained adapter is held to bf16's limits
# (measured on the H200: 1.7e-3 to 2.4e-3 nats/token, top-1 93%). The KL limits sit ~8x above what correct merges
# measured and >10x below what wrong ones did; top-1 separates less well (correct 93-97%, wrong 62-77% on the H200)
# (docs/BENCHMARKS.md "Merge check").
COARSER = ["float32", "float16", "bfloat16"]  # by mantissa bits: 23, 10, 7
CHECK_LIMITS = {
    "float32": (1e-5, 0.995, 0.01),
    "bfloat16": (2e-2, 0.85, 0.25),
    "float16": (5e-3, 0.90, 0.10),
}


class MergeCheck(BaseModel):
    """How far the merged model's logits are from base + adapter, and whether that is within the dtype's limits."""

    dtype: str
    positions: int
    kl_mean: float  # mean over tokens of KL(reference || merged), nats
    kl_max: float
    top1_agreement: float
    mean_abs_diff: float
    max_abs_diff: float
    adapter_kl: float  # mean KL(reference || base without adapter): the adapter's own effect
    unreproduced: float | None  # kl_mean / adapter_kl; None when the adapter's effect is below the dtype's noise
    limits: dict[str, float]
    limits_of: str  # the precision whose limits apply: the coarser of the saved dtype and the reference's arithmetic
    passed: bool
    problems: list[str]


class MergeRecord(BaseModel):
    key: str
    dir: str
    merged_dir: str
    dtype: str
    dequantized_from_4bit: bool
    merged_modules: int
    check_prompts: int
    check: MergeCheck
    # Kept flat for the UI table and the model card.
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    kl_mean: float
    seconds: float

    def outputs_exist(self) -> bool:
        return (is_complete(Path(self.dir)) and (Path(self.merged_dir) / "config.json").is_file() and weights_present(Path(self.merged_dir))
                and changed_file(Path(self.dir)) is None)  # a shard cut short or changed in place since, by the marker's list


def weights_present(folder: Path) -> bool:
    """`folder` (a save_pretrained one) holds its safetensors weights: model.safetensors, or an index and every shard it
    names. config.json alone was taken for a merged model: its weights deleted, the folder was published without them."""
    if (folder / "model.safetensors").is_file():
        return safetensors_whole(folder / "model.safetensors")
    try:
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all(safetensors_whole(folder / s) for s in shards)  # each one whole: a shard cut short too


def merge_dtype(merge: MergeSection, quant: QuantSection, device: str):
    """The saved dtype: as configured, or the training compute dtype for `auto`."""
    import torch

    if merge.dtype != "auto":
        return getattr(torch, merge.dtype)
    return compute_dtype(quant, device)


def cache_key(data: DataRecord, train, model: ModelSection, quant: QuantSection, merge: MergeSection, device: str) -> str:
    # Keyed on the adapter's content, not the train key (training stops by the clock: one train key, many adapters);
    # the base it merges into, how the base is loaded, the device (merge.dtype auto follows it) and the check prompts;
    # the tokenizer saved beside the merged weights: the template and how it renders (`rendering_key`).
    dev = resolve_device(device)
    return fingerprint("merge", MERGE_VERSION, folder_fingerprint(train.adapter_dir), rows_key(data), data.model_fingerprint,
                       keyed_quant(quant, dev), _keyed_merge(merge, quant, dev), model.chat_template, dev, *rendering_key(data),
                       *remote_code_key(model))


def _keyed_merge(merge: MergeSection, quant: QuantSection, device: str) -> dict:
    """The merge section as the key holds it: a dtype written out as what `auto` saves (the compute dtype) is `auto`."""
    out = merge.model_dump(mode="json")
    if merge.dtype != "auto" and merge_dtype(merge, quant, device) == compute_dtype(quant, device):
        out["dtype"] = "auto"
    return out


def merge_adapter(data: DataRecord, train, model: ModelSection, quant: QuantSection, merge: MergeSection, device: str, artifacts_dir: str, log_fn=None) -> MergeRecord:
    """Stage 6: merged safetensors model + equivalence check. Merging twice is a no-op (cached by key)."""
    key = cache_key(data, train, model, quant, merge, device)
    out = stage_dir(artifacts_dir, "merge", key)
    with locked(out, log_fn=log_fn):
        if is_complete(out):
            return complete_record(out, MergeRecord)
        return _merge(data, train, model, quant, merge, resolve_device(device), key, out, artifacts_dir, log_fn or (lambda m: None))


def _merge(data, train, model_cfg, quant, merge, device, key, out, artifacts_dir, log_fn) -> MergeRecord:
    from peft import PeftModel

    maybe_fault("merge")
    t0 = time.monotonic()
    ref = resolve_model(model_cfg, artifacts_dir)
    tok = load_tokenizer(ref, model_cfg)
    dtype = merge_dtype(merge, quant, device)
    was_4bit = uses_4bit(quant, device)
    with quiet_transformers():
        base = load_base_model(ref, model_cfg, quant, device)  # exactly as training loaded it
        model = PeftModel.from_pretrained(base, train.adapter_dir)  # adapters upcast to fp32 (PEFT's default)
    model.eval()

    batch = check_batch(data, merge.check_prompts, tok.pad_token_id, device)
    state, n_merged = merged_state_dict(model, dtype)
    expected = lora_module_count(model)
    if n_merged != expected or n_merged == 0:
        raise StageError(f"merge: {n_merged} of {expected} LoRA modules merged; the adapter in {train.adapter_dir} is intact — report this")
    reference, without_adapter = reference_logits(model, batch)
    config = model.get_base_model().config
    generation_config = getattr(model.get_base_model(), "generation_config", None)
    del model, base
    _free(device)

    with building(out, record_files=True) as tmp:  # each file's size and sha256: a shard cut short or changed is refused (`changed_file`)
        mdir = tmp / "merged"
        save_merged(state, config, generation_config, dtype, mdir, code_revisions=model_code_revisions(model_cfg),
                    trust_remote_code=model_cfg.trust_remote_code, revision=ref.revision)  # the commits the base loaded: its key's
        tok.save_pretrained(str(mdir))
        del state
        check = verify_merged(mdir, batch, reference, without_adapter, dtype, device, reference_dtype=compute_dtype(quant, device),
                              trust_remote_code=model_cfg.trust_remote_code)
        if not check.passed:
            raise StageError(f"merge check failed for the {check.dtype} merge: {'; '.join(check.problems)}; the adapter in "
                             f"{train.adapter_dir} is intact and nothing was published; rerun with --set merge.dtype=float32 (only the merge reruns) "
                             "to see whether rounding is the cause, else report it")
        rec = MergeRecord(
            key=key,
            dir=str(out),
            merged_dir=str(out / "merged"),
            dtype=check.dtype,
            dequantized_from_4bit=was_4bit,
            merged_modules=n_merged,
            check_prompts=int(batch["input_ids"].shape[0]),
            check=check,
            max_abs_diff=check.max_abs_diff,
            mean_abs_diff=check.mean_abs_diff,
            top1_agreement=check.top1_agreement,
            kl_mean=check.kl_mean,
            seconds=round(time.monotonic() - t0, 2),
        )
        write_json(tmp / "record.json", rec.model_dump(mode="json"))
    log_fn(f"merge: {n_merged} LoRA modules merged in fp32, saved {rec.dtype}; vs base+adapter: KL {check.kl_mean:.2e} nats/token, "
           f"top-1 {check.top1_agreement:.2%}, mean |Δlogit| {check.mean_abs_diff:.2e} (adapter's own effect KL {check.adapter_kl:.2e})")
    return rec


# ---------------------------------------------------------------------------------------------------------
# The merge itself


def merged_state_dict(peft_model, dtype) -> tuple[dict, int]:
    """The base model's state dict with every LoRA delta merged, on CPU in `dtype`, and the count of merged modules.

    Per LoRA layer: the base weight as the adapter saw it (NF4 dequantized, or the plain weight) in fp32 +
    PEFT's `get_delta_weight` in fp32, rounded once to `dtype`. Other 4-bit layers (not targeted) are
    dequantized; everything else is copied. Names are the plain model's (no `base_layer`, no PEFT prefix).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    wrapped: list[str] = []
    merged = 0
    with torch.no_grad():
        for name, module in base.named_modules():
            if any(name == w or name.startswith(w + ".") for w in wrapped):
                continue  # base_layer / lora_A / lora_B / lora_dropout inside a wrapped layer: handled below
            prefix = f"{name}." if name else ""
            if isinstance(module, BaseTunerLayer) and hasattr(module, "parameter_name"):
                wrapped.append(name)
                merged += _merge_expert_weights(module, prefix, dtype, state)
                continue
            if isinstance(module, BaseTunerLayer):
                wrapped.append(name)
                layer = module.get_base_layer()
                w = _dense_weight(layer.weight).to(torch.float32, copy=True)  # a copy: the sum must not land in the live base weight
                for adapter in module.active_adapters:
                    if adapter in getattr(module, "lora_A", {}):
                        delta = module.get_delta_weight(adapter).float().to(w.device)
                        _check_delta(module, adapter, delta, name)
                        w += delta
                        merged += 1
                state[prefix + "weight"] = _as_source_layout(layer, w).to(dtype).cpu()
                if getattr(layer, "bias", None) is not None:
                    state[prefix + "bias"] = layer.bias.detach().to(dtype).cpu()
                continue
            for pname, p in module.named_parameters(recurse=False):
                dense = _dense_weight(p)
                state[prefix + pname] = (_as_source_layout(module, dense) if pname == "weight" else dense).to(dtype).cpu()
            for bname, b in module.named_buffers(recurse=False):
                if bname not in module._non_persistent_buffers_set:
                    state[prefix + bname] = (b.to(dtype) if b.is_floating_point() else b).cpu()
    return state, merged


def _as_source_layout(layer, w):
    """A weight in the layout of the plain model's own layer. transformers quantizes a Conv1D (GPT-2's c_attn, c_fc,
    c_proj: weight [in, out]) into a bitsandbytes Linear4bit/Linear8bitLt (weight [out, in]), transposed, and marks the
    layer's `source_cls`; dequantized, such a weight (and the LoRA delta PEFT adds to it as a Linear's) is transposed
    back for the plain model's Conv1D (its square attn.c_proj included, which no shape check could tell)."""
    from transformers.pytorch_utils import Conv1D

    source = getattr(layer, "source_cls", None)
    quantized = type(getattr(layer, "weight", None)).__name__ in ("Params4bit", "Int8Params")
    return w.T.contiguous() if quantized and isinstance(source, type) and issubclass(source, Conv1D) else w


def _merge_expert_weights(module, prefix: str, dtype, state: dict) -> int:
    """A module whose parameters PEFT adapted directly (`target_parameters`: a MoE layer's 3-D expert weights). One
    ParamWrapper per adapted parameter, nested when there are several (experts.gate_up_proj inside experts.down_proj):
    each parameter gets its deltas added in fp32, the innermost module's other parameters are copied. Returns the
    (wrapper, adapter) pairs merged."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas: dict = {}
    merged = 0
    layer = module
    while isinstance(layer, BaseTunerLayer) and hasattr(layer, "parameter_name"):
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_A", {}):
                delta = layer.get_delta_weight(adapter).float()
                deltas[layer.parameter_name] = deltas.get(layer.parameter_name, 0) + delta
                merged += 1
        layer = layer.base_layer
    for pname, p in layer.named_parameters(recurse=False):
        w = _dense_weight(p).to(torch.float32, copy=True)
        if pname in deltas:
            if tuple(deltas[pname].shape) != tuple(w.shape):
                raise StageError(f"merge: the delta for {prefix}{pname} has shape {tuple(deltas[pname].shape)}, the weight {tuple(w.shape)}; "
                                 "publish the adapter unmerged (report this)")
            w += deltas[pname].to(w.device)
        state[prefix + pname] = w.to(dtype).cpu()
    for bname, b in layer.named_buffers(recurse=False):
        if bname not in layer._non_persistent_buffers_set:
            state[prefix + bname] = (b.to(dtype) if b.is_floating_point() else b).cpu()
    return merged


def lora_module_count(peft_model) -> int:
    """(module, adapter) pairs that carry LoRA weights: what a complete merge must have merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in peft_model.modules() if isinstance(m, BaseTunerLayer)
               for a in m.active_adapters if a in getattr(m, "lora_A", {}))


def _check_delta(module, adapter: str, delta, name: str, probes: int = 16) -> None:
    """The fp32 delta must reproduce the LoRA branch as training ran it (scale, orientation, which adapter):
    on random inputs X, X @ delta^T == lora_B(lora_A(X)) * scaling, to fp32 accuracy."""
    import torch

    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    x = torch.randn(probes, lora_a.in_features, device=lora_a.weight.device, dtype=torch.float32,
                    generator=torch.Generator(lora_a.weight.device).manual_seed(0))
    want = lora_b(lora_a(x.to(lora_a.weight.dtype))).float() * module.scaling[adapter]
    # A Conv1D (GPT-2's c_attn...) keeps its weight as [in, out]: PEFT's delta for it (fan_in_fan_out) is transposed too.
    got = x @ (delta if getattr(module, "fan_in_fan_out", False) else delta.T).to(x.device)
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    if want.norm() > 0 and err > 1e-3:
        raise StageError(f"merge: the delta for {name} does not reproduce its LoRA layer ({err:.1e} relative error); "
                         "the adapter uses a LoRA variant this merge does not support — publish the adapter unmerged (report this)")


def _dense_weight(p):
    """A parameter's values as the forward pass uses them: bitsandbytes 4/8-bit weights dequantized."""
    if type(p).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_bnb_weight

        if getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False):
            raise StageError("a 4-bit weight was repacked for bitsandbytes' CPU inference kernel before merging; merge before any eval-mode forward")

        return dequantize_bnb_weight(p, getattr(p, "quant_state", None) or getattr(p, "SCB", None))
    return p.detach()


def save_merged(state: dict, config, generation_config, dtype, out_dir: Path, *, code_revisions: dict[str, str],
                trust_remote_code: bool = False, revision: str | None = None) -> None:
    """A plain (unquantized, PEFT-free) model folder from a merged state dict: safetensors + config. `code_revisions`:
    {auto class: commit} of another repository's code the base ran (`model_code_revisions`: the commits its stage keys
    hold; provenance.json `base.code_revisions`), which its auto_map's class is rebuilt at. Given by the caller, not read
    from what this process loaded: called in a process that had not loaded the base, that knew no commit and rebuilt
    the class at the other repository's main. `revision`: the Hub model's, which its own code (an auto_map entry
    without "--") is rebuilt at."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    with torch.device("meta"), quiet_transformers():
        # the class the base ran, at the commit its load passed: save_pretrained copies its module into merged/
        clean = pinned_from_config(AutoModelForCausalLM, config, code_revisions if trust_remote_code else {}, revision, dtype=dtype,
                                   trust_remote_code=trust_remote_code)
    missing, unexpected = clean.load_state_dict(state, assign=True, strict=False)
    tied = _tied_names(clean)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise StageError(f"merged weights don't fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                         "the base model's architecture changed since training — retrain or report this")
    clean.tie_weights()
    if generation_config is not None:
        clean.generation_config = generation_config
    clean.save_pretrained(str(out_dir), safe_serialization=True)


def _tied_names(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = set(tied) if isinstance(tied, (list, tuple, set)) else set(tied.keys())
    return names | ({"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set())


# ---------------------------------------------------------------------------------------------------------
# The check


def check_batch(data: DataRecord, n: int, pad_id: int, device: str) -> dict:
    from .train import PaddedCollator

    held = load_split(data, "heldout")
    batch = PaddedCollator(pad_id)([held[i] for i in range(min(n, len(held)))])
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def reference_logits(peft_model, batch: dict):
    """(base + adapter logits, base-only logits) in fp32 on CPU, computed as training computes."""
    import torch

    # bitsandbytes repacks 4-bit weights for its bf16 CPU inference kernel on the first forward of a module in
    # eval mode; training ran the unpacked fp32 path, so the reference keeps those modules in train mode (they
    # have no dropout; the LoRA dropout modules stay in eval mode).
    for m in peft_model.modules():
        if type(m).__name__ == "Linear4bit" and batch["input_ids"].device.type == "cpu":
            m.train()
    with torch.inference_mode():
        ref = peft_model(**batch).logits.float().cpu()
        with peft_model.disable_adapter():
            base = peft_model(**batch).logits.float().cpu()
    return ref, base


def verify_merged(merged_dir: Path, batch: dict, reference, without_adapter, dtype, device: str, *, reference_dtype=None,
                  trust_remote_code: bool = False) -> MergeCheck:
    """Reload the saved merged model in `dtype` and compare its logits with base + adapter (computed in `reference_dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        reloaded = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype, use_safetensors=True,
                                                        trust_remote_code=trust_remote_code).to(device)
    reloaded.eval()
    with torch.inference_mode():
        got = reloaded(**batch).logits.float().cpu()
    del reloaded
    _free(device)
    names = [str(d).replace("torch.", "") for d in (dtype, reference_dtype or dtype)]
    return compare_logits(reference, got, without_adapter, batch["attention_mask"].bool().cpu(), names[0], limits_of=max(names, key=COARSER.index))


def compare_logits(reference, merged, without_adapter, mask, dtype: str, limits_of: str | None = None) -> MergeCheck:
    """Dtype-aware equivalence measures of `merged` vs `reference` logits over the unpadded positions; the limits
    are those of `limits_of` (the coarser precision of the two sides), `dtype` by default."""
    import torch

    lp_ref = torch.log_softmax(reference[mask], -1)
    kl = (lp_ref.exp() * (lp_ref - torch.log_softmax(merged[mask], -1))).sum(-1).clamp_min(0)
    adapter = (lp_ref.exp() * (lp_ref - torch.log_softmax(without_adapter[mask], -1))).sum(-1).clamp_min(0)
    diff = (merged - reference).abs()[mask]
    top1 = (merged.argmax(-1) == reference.argmax(-1))[mask].float().mean()
    limits_of = limits_of or dtype
    max_kl, min_top1, max_unreproduced = CHECK_LIMITS[limits_of]
    kl_mean, adapter_kl = float(kl.mean()), float(adapter.mean())
    # When the adapter barely changed the model (below the dtype's noise) the ratio says nothing.
    unreproduced = kl_mean / adapter_kl if adapter_kl > max_kl else None
    problems = []
    if kl_mean > max_kl:
        problems.append(f"mean KL(base+adapter ‖ merged) {kl_mean:.2e} nats/token > {max_kl:.0e} allowed for {limits_of}")
    if float(top1) < min_top1:
        problems.append(f"top-1 agreement {float(top1):.2%} < {min_top1:.1%} allowed for {limits_of}")
    if unreproduced is not None and unreproduced > max_unreproduced:
        problems.append(f"the merged model misses {unreproduced:.0%} of the adapter's effect (KL {kl_mean:.2e} vs the adapter's "
                        f"{adapter_kl:.2e}); > {max_unreproduced:.0%} allowed")
    return MergeCheck(
        dtype=dtype,
        positions=int(mask.sum()),
        kl_mean=float(f"{kl_mean:.4g}"),
        kl_max=float(f"{float(kl.max()):.4g}"),
        top1_agreement=round(float(top1), 5),
        mean_abs_diff=float(f"{float(diff.mean()):.4g}"),
        max_abs_diff=float(f"{float(diff.max()):.4g}"),
        adapter_kl=float(f"{adapter_kl:.4g}"),
        unreproduced=None if unreproduced is None else float(f"{unreproduced:.4g}"),
        limits={"max_kl_mean": max_kl, "min_top1": min_top1, "max_unreproduced": max_unreproduced},
        limits_of=limits_of,
        passed=not problems,
        problems=problems,
    )


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
