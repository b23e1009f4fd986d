"""The model-dependent checks, run by the flow before stage 1: a mistake costs seconds, not a data stage.

What the config check (tasks/config.py) cannot know without the model: that it loads (reachable, safetensors,
not truncated), that its tokenizer has a chat template that closes assistant turns with a token the model can learn
(EOS or a special end-of-turn token), gives the character offsets stage 1 labels answers by, and names vocabulary
files the published folder can hold, that the LoRA targets exist in it, and on a mixture-of-experts model what LoRA
reaches and what it cannot. The model is built on the meta device from its config: no weights are read.

    lines = check_model(cfg.model, cfg.lora, cfg.quant, cfg.device, cfg.artifacts_dir, cfg.data.system_prompt, cfg.training.engine)   # StageError if it cannot work
"""

from __future__ import annotations

from pathlib import Path

from .common import StageError
from .config import LoraSection, ModelSection, QuantSection
from .data import stop_token_ids
from .models import (MISTRAL_COMMON, LoraTargets, check_chat_template, compute_dtype, load_tokenizer, local_folder, lora_config, lora_targets, model_skeleton, peft_quietly, peft_reach,
                     recurrent_layers_of, remote_code_key, resolve_device, resolve_model, rewrites_past_answers, template_source, uses_4bit)


def check_model(model: ModelSection, lora: LoraSection, quant: QuantSection, device: str, artifacts_dir: str,
                system_prompt: str | None = None, engine: str = "auto") -> list[str]:
    """Every model-dependent check of the run; returns the lines to log before stage 1 (what LoRA adapts and what it
    cannot). `system_prompt` is data.system_prompt: the chat template must take the system turn it adds. Raises
    StageError, one line naming the key and the fix, when the run could not work."""
    ref = resolve_model(model, artifacts_dir)  # built, converted or located once; stage 1 reuses it
    remote_code_key(model)  # another repository's code that cannot be resolved (offline, not cached): its one line, before any load
    tok = load_tokenizer(ref, model)  # chat template that renders (the project's default is said once), an EOS
    check_publishable(tok, model, local_folder(ref))
    check_offsets(tok, model)
    if system_prompt:
        check_chat_template(tok, model, system_prompt)
    stop_token_ids(tok)  # the template closes assistant turns with a token the model can learn to stop on
    lines = []
    if rewrites_past_answers(tok, system_prompt):  # not an error (stage 1 trains such rows right), but a multi-turn row costs more tokens
        lines.append(f"data: {template_source(model)} renders a past answer otherwise once a later turn follows (as Qwen3's drops its "
                     "<think> block), so stage 1 trains each answer of a multi-turn row in the conversation cut after it, as the "
                     "model will be prompted: one example per answer, the earlier turns repeated in each")
    skeleton = model_skeleton(ref, model)
    recurrent = recurrent_layers_of(skeleton.config)
    if recurrent and engine in ("fast", "fused"):
        raise StageError(f"training.engine: {engine} packs conversations into one row, and this model carries a state along a row in "
                         f"its {recurrent}, so one conversation's state would reach the next; set training.engine: padded (auto picks it "
                         "for this model)")
    if recurrent and engine == "auto" and resolve_device(device) == "cuda":
        lines.append(f"model: its {recurrent} carry a state along a row: training.engine auto trains padded batches, not packed rows "
                     "(one conversation's state would reach the next)")
    targets = lora_targets(skeleton, lora)  # StageError for a name the model lacks, or a dropout its expert weights cannot take
    dev = resolve_device(device)
    if targets.parameters and uses_4bit(quant, dev):
        adapted = set(targets.parameters)  # `experts.gate_up_proj`: the last two parts of a parameter's name
        n = sum(p.numel() for name, p in skeleton.named_parameters() if ".".join(name.split(".")[-2:]) in adapted)
        dtype = compute_dtype(quant, dev)
        gib = n * dtype.itemsize / 2**30
        count = f"{n / 1e9:.1f} B" if n >= 1e8 else f"{n:,}"
        lines.append(f"model: the routed experts ({count} parameters, {gib:.2f} GiB) stay in {str(dtype).removeprefix('torch.')}, "
                     "not NF4: bitsandbytes 4-bit quantizes linear layers only; their LoRA trains on them as they are")
    targets = _check_peft_accepts(skeleton, lora, targets)  # last: it wraps the skeleton in place
    return [f"model: {targets.describe()}", *lines]


def check_publishable(tok, model: ModelSection, folder: Path | None = None) -> None:
    """A tokenizer whose class names a vocabulary file publish cannot copy (not a file inside the folder: '../x',
    '*.bin'; a remote-code class's own choice) is refused here, in seconds, not in stage 7 after the training: the
    published adapter/ would not load it, and publish refuses such a folder. So is one of a local model folder (`folder`,
    where the tokenizer loaded from; None for a Hub id, whose files huggingface_hub stores) whose vocabulary in a
    subfolder ('vocab/x') is a link out of the folder, which publish does not follow. Read from the class it loaded as,
    so a name the source computes counts too."""
    from .publish import vocabulary_refusal

    names = getattr(type(tok), "vocab_files_names", None)
    if not isinstance(names, dict):
        return
    if why := vocabulary_refusal(type(tok).__name__, names.values(), folder, f"model.name {model.name!r}"):
        raise StageError(why)


def check_offsets(tok, model: ModelSection) -> None:
    """Stage 1 trains on the answers' tokens only, told by each token's character offsets (`encode_rendering`), which
    transformers' Python ("slow") tokenizers do not give: `return_offsets_mapping` is dropped without a word, and stage 1
    stopped with KeyError: 'offset_mapping'. A remote-code tokenizer whose auto_map names no fast class is one (Qwen-1's
    QWenTokenizer, 360Zhinao's); transformers' MistralCommonBackend refuses the request (a ValueError), where
    `load_tokenizer` could not load the folder's fast tokenizer instead. Refused here, in one line whose fix fits the case."""
    try:
        gives = "offset_mapping" in tok("ab", add_special_tokens=False, return_offsets_mapping=True)
    except (ValueError, TypeError, NotImplementedError):
        gives = False
    if gives:
        return
    said = f"model.name {model.name!r}: its tokenizer class {type(tok).__name__} gives no character offsets (return_offsets_mapping), "
    if type(tok).__name__ == MISTRAL_COMMON:  # `load_tokenizer` tried transformers' switch (mistral_format=False): it did not load
        raise StageError(said + "as transformers loads a folder with tekken.json through mistral-common, and it did not load as a fast "
                         "tokenizer without mistral-common (mistral_format=False: from its tokenizer.json or tekken.json); give the "
                         "folder the model's tokenizer.json (its Hub repository's: Mistral-Nemo's and most Mistral repositories ship one)")
    raise StageError(said + "a Python tokenizer" + (" of the model's own code (its auto_map names no fast class)" if _remote_tokenizer(tok) else "")
                     + ", and stage 1 needs them to train on the answers only; use a model whose tokenizer loads as a fast (tokenizers) one, "
                     "with a tokenizer.json")


def _remote_tokenizer(tok) -> bool:
    """Whether `tok`'s class is the model's own code (a dynamic module transformers loaded from its auto_map)."""
    return not type(tok).__module__.startswith("transformers.")


def _check_peft_accepts(skeleton, lora: LoraSection, targets: LoraTargets) -> LoraTargets:
    """PEFT's own refusals (Mamba-based models take no LoRA on out_proj/conv1d, ...) before stage 1, not as a traceback in
    stage 3: wrap the meta skeleton as training will (under a second on an 8B config, no memory). Returns the targets as
    PEFT wrapped them (`peft_reach`)."""
    import re

    import torch
    from peft import get_peft_model

    try:
        with torch.device("meta"), peft_quietly():
            wrapped = get_peft_model(skeleton, lora_config(lora, targets))
    except (ValueError, TypeError, NotImplementedError) as e:
        msg = re.sub(r"^\[PEFT:[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        msg = msg.split(" Please ")[0]  # PEFT's own advice names its keyword, not ours: the fix below replaces it
        bad = set(re.findall(r"\{([^}]*)\}", msg)[-1].replace("'", "").replace(" ", "").split(",")) if "{" in msg else set()
        bad |= set(re.findall(r"Module '(\w+)'", msg))
        rest = [n for n in targets.modules if n not in bad]
        fix = f"set lora.target_modules=[{','.join(rest)}]" if bad and rest else "name other layers in lora.target_modules"
        raise StageError(f"lora.target_modules: PEFT cannot adapt this model with {', '.join(targets.modules + targets.parameters)}: "
                         f"{msg.removesuffix('.')}; {fix}") from e
    return peft_reach(wrapped, targets)
