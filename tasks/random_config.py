"""`model.random_config` checked against the config class of `random:<arch>` before any work: transformers keeps a key
its config does not know as a plain attribute that nothing reads, so a misspelt `hiden_size` would build a model of the
default shape without a word. Its own module, apart from tasks/models.py (which builds the model), because tasks/config.py
calls it while loading the config and tasks/models.py imports tasks/config.py."""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import re
import typing
from pathlib import Path

from .common import transformers_logs_at_error

# The byte tokenizer's size and ids, which tasks.models gives the random model's config (random_config's win), and its
# text model's too in a multimodal config: read by the builder at the top level of any architecture.
TOKENIZER_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def random_config_problems(arch: str, random_config: dict) -> list[str]:
    """`random:<arch>` and its `model.random_config`, one line per problem. Sub-configs (gemma3's text_config,
    vision_config) are checked against their own classes."""
    from transformers import CONFIG_MAPPING

    if arch not in CONFIG_MAPPING:
        close = difflib.get_close_matches(arch, list(CONFIG_MAPPING.keys()), n=1)
        fix = f"did you mean random:{close[0]}?" if close else "use a transformers model type such as mistral or llama"
        return [f"model.name random:{arch}: not a transformers model type; {fix}"]
    cls = CONFIG_MAPPING[arch]
    given = {k: v for k, v in random_config.items() if k != "model_type" and k not in TOKENIZER_KEYS}  # these the builder reads
    problems = _unknown_config_keys(cls, given, "model.random_config", f"{arch}'s config ({cls.__name__})", arch)
    if "model_type" in random_config:  # the builder passes model.name's type: a second one is a TypeError there
        problems.insert(0, f"model.random_config.model_type: model.name random:{arch} sets it; remove it, or set "
                           f"model.name=random:{random_config['model_type']}")
    return problems


def random_config_takes_none(arch: str, path: list[str], random_config: dict) -> bool:
    """Whether `random:<arch>`'s config takes None as the value of the key at `path` inside random_config
    (mistral's sliding_window: None = no window), following sub-configs (text_config.sliding_window)."""
    from transformers import CONFIG_MAPPING

    cls, node = CONFIG_MAPPING[arch] if arch in CONFIG_MAPPING else None, random_config
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        cls = _sub_config_class(cls, part, node if isinstance(node, dict) else {}) if cls is not None else None
    return cls is not None and _config_keys(cls).get(path[-1], False)


def _unknown_config_keys(cls, given: dict, prefix: str, what: str, arch: str) -> list[str]:
    keys = _config_keys(cls)
    problems = []
    for key, value in given.items():
        sub = _sub_config_class(cls, key, value) if isinstance(value, dict) else None
        if isinstance(sub, str):
            problems.append(f"{prefix}.{key}.model_type: {sub}")
        elif sub is not None:
            entries = {k: v for k, v in value.items() if k != "model_type"}
            problems += _unknown_config_keys(sub, entries, f"{prefix}.{key}", f"{arch}'s {key} ({sub.__name__})", arch)
        elif key not in keys and _stored_unused(cls, key, value):
            problems.append(f"{prefix}.{key}: not a key of {what}, which would keep it unread (the model builds as if it were absent); "
                            f"{_key_fix(cls, key, value, prefix, keys)}")
    return problems


def _key_fix(cls, key: str, value, prefix: str, keys: dict[str, bool]) -> str:
    """The nearest real key: the sub-config that reads it (gemma3's hidden_size is text_config's), else a key holding all of
    its words (num_layers -> num_hidden_layers, not num_labels), else the closest spelling."""
    subs = getattr(cls, "sub_configs", None) or {}
    for sub in subs:
        sub_cls = _sub_config_class(cls, sub, {})
        if isinstance(sub_cls, type) and key in _config_keys(sub_cls):
            return f"set it inside {sub}: {prefix}.{sub}.{key}"
    if isinstance(value, dict) and not subs:
        return f"{cls.__name__} has no sub-configs: set these keys in {prefix} itself"
    words = set(key.split("_"))
    close = (difflib.get_close_matches(key, sorted(k for k in keys if words <= set(k.split("_"))), n=2, cutoff=0)
             or difflib.get_close_matches(key, sorted(keys), n=1))
    return f"did you mean {' or '.join(close)}?" if close else f"remove it, or use a parameter of {cls.__name__}"


def _sub_config_class(cls, key: str, value: dict):
    """The config class a dict under `key` becomes (gemma3's text_config: Gemma3TextConfig; its vision_config, declared
    as AutoConfig: the default's SiglipVisionConfig, or the class of the dict's own model_type); None when `key` is no
    sub-config (then the dict is a plain value, e.g. rope_parameters); a string saying why for an unknown model_type."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    if key not in (getattr(cls, "sub_configs", None) or {}):
        return None
    if "model_type" in value:
        kind = value["model_type"]
        return CONFIG_MAPPING[kind] if kind in CONFIG_MAPPING else f"{kind!r} is not a transformers model type"
    declared = cls.sub_configs[key]
    if declared is not AutoConfig and isinstance(declared, type) and issubclass(declared, PretrainedConfig):
        return declared
    default = getattr(_config_default(cls), key, None)
    return type(default) if isinstance(default, PretrainedConfig) else None


@functools.cache
def _config_default(cls):
    """The config class built with its defaults; None where it cannot be built bare."""
    try:
        with transformers_logs_at_error():
            return cls()
    except Exception:
        return None


@functools.cache
def _config_keys(cls) -> dict[str, bool]:
    """The keys a config class reads, each with whether None is a value it takes: its own and PretrainedConfig's
    __init__ parameters (None where annotated `| None`), its default instance's public attributes (None where that
    default is None), settable properties (num_labels, rope_scaling), `attribute_map` aliases (gpt2's hidden_size) and
    GenerationConfig's fields (cache_implementation: `GenerationConfig.from_model_config` reads them off the config)."""
    from transformers import GenerationConfig, PretrainedConfig

    keys: dict[str, bool] = {}
    for c in (PretrainedConfig, cls):
        for p in inspect.signature(c.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                keys[p.name] = _takes_none(p)
    default = _config_default(cls)
    for name, value in [*(vars(default).items() if default is not None else ()), *vars(GenerationConfig()).items()]:
        if not name.startswith("_"):
            keys.setdefault(name, value is None)
    for c in cls.__mro__:
        for name, attr in vars(c).items():
            if isinstance(attr, property) and attr.fset is not None and not name.startswith("_"):
                keys.setdefault(name, False)
    for alias, target in (getattr(cls, "attribute_map", None) or {}).items():
        keys.setdefault(alias, keys.get(target, False))
    return keys


def _takes_none(p: inspect.Parameter) -> bool:
    ann = p.annotation
    if ann is p.empty:  # transformers 4's unannotated parameters: None only where it is the default
        return p.default is None
    if isinstance(ann, str):  # a module under `from __future__ import annotations`
        return bool(re.search(r"\bNone\b|Optional\[|\bAny\b", ann))
    return ann is typing.Any or ann is None or type(None) in typing.get_args(ann)


def _stored_unused(cls, key: str, value) -> bool:
    """Whether nothing reads `key`: the config keeps it as a plain attribute (what it does with a kwarg it does not know)
    and no code that reads this config takes it from the config: `config.<key>`, `getattr(config, "<key>"` (qwen3_moe's
    head_dim) or, in __init__, `kwargs.get("<key>"` (phi3's partial_rotary_factor). A key merely named there (a dict key
    of rope_parameters, `hasattr(self, "num_heads")` in a shared check) is no reader. A key the __init__ consumes without
    a parameter of that name (rope_theta, attn_implementation) is read too."""
    try:
        with transformers_logs_at_error():
            stored = key in vars(cls(**{key: copy.deepcopy(value)}))
    except Exception:  # refused: something read it (the build names a bad value)
        return False
    k = re.escape(key)
    return stored and not re.search(rf"""\bconfig\.{k}\b|getattr\(\s*(?:self\.)?config,\s*["']{k}["']|kwargs\.(?:get|pop)\(\s*["']{k}["']""",
                                    _config_sources(cls))


@functools.cache
def _config_sources(cls) -> str:
    """The code that reads a config of this class: its configuration module and, for a model's own config, the modeling
    modules beside it and transformers' shared configuration_utils.py and modeling_rope_utils.py. A config with
    sub-configs (gemma3's) gets only its configuration module: its modeling code reads `config.hidden_size` off the
    text_config, and a flat hidden_size beside it would build a default-shaped (2.7B) text model."""
    import transformers

    own = Path(inspect.getfile(cls))
    shared = Path(transformers.__file__).parent
    files = [own] if getattr(cls, "sub_configs", None) else [
        own, *sorted(own.parent.glob("modeling_*.py")), shared / "configuration_utils.py", shared / "modeling_rope_utils.py"]
    return "\n".join(f.read_text(encoding="utf-8") for f in dict.fromkeys(files) if f.is_file())
