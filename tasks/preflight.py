"""The model-dependent checks, run by the flow before stage 1: a mistake costs seconds, not a data stage.

What the config check (tasks/config.py) cannot know without the model: that it loads (reachable, safetensors,
not truncated), that its tokenizer has a chat template that closes assistant turns with a token the model can learn
(EOS or a special end-of-turn token), that the LoRA targets exist in it, and on a mixture-of-experts model what LoRA
reaches and what it cannot. The model is built on the meta device from its config: no weights are read.

    lines = check_model(cfg.model, cfg.lora, cfg.quant, cfg.device, cfg.artifacts_dir)   # StageError if it cannot work
"""

from __future__ import annotations

from .common import StageError
from .config import LoraSection, ModelSection, QuantSection
from .data import stop_token_ids
from .models import compute_dtype, load_tokenizer, lora_targets, model_skeleton, resolve_device, resolve_model, uses_4bit


def check_model(model: ModelSection, lora: LoraSection, quant: QuantSection, device: str, artifacts_dir: str) -> list[str]:
    """Every model-dependent check of the run; returns the lines to log before stage 1 (what LoRA adapts and what it
    cannot). Raises StageError, one line naming the key and the fix, when the run could not work."""
    ref = resolve_model(model, artifacts_dir)  # built, converted or located once; stage 1 reuses it
    tok = load_tokenizer(ref, model)  # chat template (the project's default is said once), an EOS
    stop_token_ids(tok)  # the template closes assistant turns with a token the model can learn to stop on
    skeleton = model_skeleton(ref, model)
    targets = lora_targets(skeleton, lora)
    if targets.parameters and lora.dropout > 0:
        raise StageError(f"lora.dropout: {lora.dropout:g} cannot apply to the routed experts' weights ({', '.join(targets.parameters)}): PEFT "
                         "adapts 3-D expert weights without dropout; set lora.dropout=0 (the MoE profile does), or name only linear "
                         "layers in lora.target_modules to leave the experts frozen")
    lines = [f"model: {targets.describe()}"]
    dev = resolve_device(device)
    if targets.parameters and uses_4bit(quant, dev):
        adapted = set(targets.parameters)  # `experts.gate_up_proj`: the last two parts of a parameter's name
        n = sum(p.numel() for name, p in skeleton.named_parameters() if ".".join(name.split(".")[-2:]) in adapted)
        dtype = compute_dtype(quant, dev)
        gib = n * dtype.itemsize / 2**30
        count = f"{n / 1e9:.1f} B" if n >= 1e8 else f"{n:,}"
        lines.append(f"model: the routed experts ({count} parameters, {gib:.2f} GiB) stay in {str(dtype).removeprefix('torch.')}, "
                     "not NF4: bitsandbytes 4-bit quantizes linear layers only; their LoRA trains on them as they are")
    return lines
