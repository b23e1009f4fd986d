"""Hub revisions, resolved once per run and pinned into its config.

A hub model or dataset without a pinned `revision` follows the hub's `main`, which moves. The flow asks the hub once,
at the start of a run, for the commit `main` points at, and pins it into the run's config: every stage is keyed on it
and loads exactly it, and the run's summary records it. A retry of the same flow run reuses the revisions its first
attempt recorded, and rerunning a failed or crashed run (the same command: how a run resumes) reuses that run's.
When the hub does not answer (outage, timeout, offline mode), the commit this artifacts folder last resolved for the
name is used, so a crashed run resumed during an outage finds its stages and checkpoints under the
same keys; with no such record the run goes on unpinned (keyed as `unresolved`) and says so.

    cfg, revisions, warnings = pin_hub_revisions(cfg)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .common import artifacts_root, locked, read_json, write_json
from .config import PipelineConfig

HUB_TIMEOUT_S = 10.0
RECORD = "hub-revisions.json"  # under <artifacts>/cache/: the last commit resolved per hub name


def hub_entries(cfg: PipelineConfig) -> dict[str, tuple[str, str, str | None]]:
    """Config key -> (kind, hub name, pinned revision) of every hub model/dataset the run reads."""
    out: dict[str, tuple[str, str, str | None]] = {}
    if is_hub_id(cfg.model.name):
        out["model"] = ("model", cfg.model.name, cfg.model.revision)
    for key, src in [("data", cfg.data), *((f"data.mix[{i}]", m) for i, m in enumerate(cfg.data.mix))]:
        if is_hub_id(src.source):
            out[key] = ("dataset", src.source, src.revision)
    return out


def is_hub_id(name: str) -> bool:
    """owner/name, and not a local path or file, a `pypi:` package, a `random:` model or the embedded tasks (the rule
    tasks/data.py and tasks/models.py apply; a name they refuse is their one-line error, not this module's)."""
    from .data import LOCAL_SUFFIXES

    return (name.count("/") == 1 and not name.startswith((".", "/", "~", "pypi:", "random:"))
            and Path(name).suffix.lower() not in LOCAL_SUFFIXES and not Path(name).expanduser().exists())


class HubAnswered(RuntimeError):
    """The hub's own answer to `ask_hub` about the name, other than a commit: not found (404, RepositoryNotFoundError: a
    misspelt id), unauthorized or forbidden (401/403: a private or gated model), a disabled repo, an unknown revision, a bad
    request (400), gone (410), or a reply without a commit. Raised from the hub's error, which `_why` names."""


# The statuses that are the hub's verdict on the name. Not 407 (a proxy's), 408 (a timeout), 429 (slow down) or a 5xx (the
# hub is down): those say nothing about the name, and a later request (the model checks' downloads) may well get through.
HUB_ANSWERS = {400, 401, 403, 404, 410}


def ask_hub(kind: str, name: str, token: str | None) -> str:
    """The commit `main` points at now. Raises HubAnswered when the hub answers with an error of its own about the name,
    and whatever else the lookup raises (a network error, a timeout after HUB_TIMEOUT_S, a 429 or 5xx) when it does not:
    `hub_reply` sorts those. A reply that is not the hub API's (a captive portal's or a proxy's HTML page with a 200, a
    wrong HF_ENDPOINT, a 3xx whose JSON has no `id`) is a ConnectionError saying so: no hub was reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (DisabledRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    api = HfApi()
    try:
        info = (api.model_info if kind == "model" else api.dataset_info)(name, timeout=HUB_TIMEOUT_S, token=token)
    except HfHubHTTPError as e:  # GatedRepoError is a RepositoryNotFoundError
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, (RepositoryNotFoundError, DisabledRepoError, RevisionNotFoundError)) or status in HUB_ANSWERS:
            raise HubAnswered(str(e)) from e
        raise
    except HFValidationError:  # a ValueError, but about the name (check_hub_ids words it), not the reply
        raise
    except (ValueError, KeyError, TypeError) as e:  # the body is no JSON (JSONDecodeError is a ValueError), no JSON object
        # (a list, null or a string: ModelInfo(**body) is a TypeError), or lacks the info's fields
        raise ConnectionError(f"the hub's reply at {api.endpoint} is not its API's: {_why(e)}") from e
    if not info.sha:
        raise HubAnswered("the hub gave no commit")
    return info.sha


def hub_reply(error: BaseException) -> str | None:
    """What a failed `ask_hub` got: "answered" (HubAnswered: the hub's word on the name), "unreachable" (no connection: a
    network error, a timeout, huggingface_hub's offline mode, a reply that is not the hub API's), "failed" (an HTTP error
    that says nothing about the name: a 429, a 5xx, a proxy's 407; or another OSError), or None: not a lookup error at
    all (a bug, a full disk's RuntimeError), which the caller re-raises rather than call the hub unreachable."""
    if isinstance(error, HubAnswered):
        return "answered"
    # OfflineModeIsEnabled is a ConnectionError, and so is ask_hub's for a reply that is not the hub API's
    if isinstance(error, (ConnectionError, TimeoutError, *_transport_errors())):
        return "unreachable"
    if isinstance(error, OSError):  # HfHubHTTPError is one, and requests' errors
        return "failed"
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' no-connection errors (huggingface_hub's httpx2; httpx and requests where installed), which are
    not OSErrors (requests' are, but not ConnectionErrors)."""
    out: list[type[BaseException]] = []
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names]
    return tuple(out)


def check_hub_ids(cfg: PipelineConfig) -> None:
    """A hub name huggingface_hub refuses (`someorg/a--b`, a space) is a StageError in one line naming the key, where
    it was HFValidationError's traceback from the first lookup."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .common import StageError

    for key, (kind, name, _) in hub_entries(cfg).items():
        try:
            validate_repo_id(name)
        except HFValidationError as e:
            raise StageError(f"{_name_key(key)} {name!r} is not a hub id or a local {'folder' if kind == 'model' else 'file'}: "
                             f"{str(e).rstrip('.')}; fix the name") from e


HOW = {"answered": "hub answered", "unreachable": "hub unreachable", "failed": "hub lookup failed"}  # an entry's `how`, by `hub`


def pin_hub_revisions(cfg: PipelineConfig, earlier: dict[str, Any] | None = None) -> tuple[PipelineConfig, dict[str, Any], list[str]]:
    """(config with every unpinned hub revision pinned, what was resolved and how, warnings to log).

    earlier: the `hub_revisions` a previous attempt of this same run recorded (reused as they are).
    An entry the hub was asked about just now and did not resolve says what it got in `hub` (`hub_reply`: "answered",
    "unreachable" or "failed") and `why`, which check_hub_reachable reuses rather than asking again.
    """
    from .models import hub_token

    entries = hub_entries(cfg)
    if not entries:
        return cfg, {}, []
    check_hub_ids(cfg)
    record_path = artifacts_root(cfg.artifacts_dir) / "cache" / RECORD
    known = _read(record_path)
    pinned = cfg.model_copy(deep=True)
    revisions: dict[str, Any] = {}
    warnings: list[str] = []
    for key, (kind, name, revision) in entries.items():
        if revision is not None:
            revisions[key] = {"name": name, "revision": revision, "how": "pinned in the config"}
            continue
        prior = (earlier or {}).get(key)
        if prior and prior.get("name") == name and prior.get("revision"):
            # `hub`/`why` are what the hub said to that attempt, maybe hours ago: not an answer check_hub_reachable may reuse
            entry = {**{k: v for k, v in prior.items() if k not in ("hub", "why")}, "how": "recorded by this run's earlier attempt"}
        else:
            try:
                entry = {"name": name, "revision": ask_hub(kind, name, hub_token(cfg.model) if kind == "model" else None),
                         "how": "resolved", "at": _now()}
                known[f"{kind}:{name}"] = {"revision": entry["revision"], "at": entry["at"]}
            except Exception as e:  # network errors come in many classes (hub_reply sorts them); any other is raised
                if (reply := hub_reply(e)) is None:
                    raise
                why = _why(e)
                said = {"hub": reply, "why": why}
                last = known.get(f"{kind}:{name}")
                if last:
                    entry = {"name": name, "revision": last["revision"], "how": f"{HOW[reply]} ({why}); last resolved {last['at']}", **said}
                    warnings.append(f"hub: cannot resolve {kind} {name!r} ({why}); using {last['revision'][:12]}, the commit this "
                                    f"artifacts folder resolved on {last['at']}; set {_config_key(key)}=<commit> to choose one")
                else:
                    entry = {"name": name, "revision": None, "how": f"unresolved ({why})", **said}
                    warnings.append(f"hub: cannot resolve {kind} {name!r} ({why}) and no earlier run recorded a commit; keyed as "
                                    f"unresolved: a later run that reaches the hub will not reuse this run's stages. Set "
                                    f"{_config_key(key)}=<commit> to pin one")
        revisions[key] = entry
        if entry["revision"]:
            _section(pinned, key).revision = entry["revision"]
    if any(e["how"] == "resolved" for e in revisions.values()):
        with locked(record_path):
            write_json(record_path, {**_read(record_path), **known})
    return pinned, revisions, warnings


@contextmanager
def hub_offline_restored() -> Iterator[None]:
    """huggingface_hub's offline switch (and HF_HUB_OFFLINE in the environment) as they were before, on exit: what
    `check_hub_reachable` turns on lasts one run, not the process (a library caller's or a test's next run)."""
    from huggingface_hub import constants

    before, env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def check_hub_reachable(cfg: PipelineConfig, revisions: dict[str, Any]) -> list[str]:
    """Before the model checks: a hub model the hub cannot be reached about (no connection, a timeout, offline mode) is
    loaded from the local hub cache with huggingface_hub offline for the rest of the run (returns the line to log), and
    one that is not cached is a StageError in one line. Both sat through huggingface_hub's retries, 5 per request with
    1+2+4+8+8 s between them, which no setting turns off: ~48 s and ~45 log lines before the error offline, and as long
    before a cached model loaded (transformers lists the repo's chat templates and files; 2026-12-06). The hub's own
    answer (a typo's 404, a gated model's 401/403) goes on to the model checks, which say which; so does a reply that
    says nothing about the name (a 429, a 5xx): the hub is there, and the checks' downloads may get through, with their
    retries. `revisions` is what `pin_hub_revisions` found just now: when it asked the hub about the model, what it got
    (a commit, an answer, an error, no connection) is reused, so a user with no network waits for one lookup, not two;
    else (a revision pinned in the config or by an earlier attempt) the hub is asked once, without retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    from .common import StageError
    from .models import hub_token

    entry = revisions.get("model") or {}
    # pin_hub_revisions' warning has said what a "failed" lookup got (its status): not said twice
    if not is_hub_id(cfg.model.name) or entry.get("how") == "resolved" or entry.get("hub") in ("answered", "failed"):
        return []
    if entry.get("hub") == "unreachable":  # pin_hub_revisions asked just now and got no answer: not asked twice
        why, error = entry["why"], None
    else:
        check_hub_ids(cfg)
        try:
            ask_hub("model", cfg.model.name, hub_token(cfg.model))
            return []
        except Exception as e:  # network errors come in many classes (hub_reply sorts them); any other is raised
            reply = hub_reply(e)
            if reply is None:
                raise
            if reply == "answered":
                return []
            if reply == "failed":
                return [f"hub: cannot check model {cfg.model.name!r} ({_why(e)}); going on to the model checks, which ask again"]
            why, error = _why(e), e
    if not isinstance(try_to_load_from_cache(cfg.model.name, cfg.model.gguf_file or "config.json", revision=cfg.model.revision), str):
        if constants.HF_HUB_OFFLINE:  # the user's: this run turns it on only below
            raise StageError(f"cannot reach the hub for {cfg.model.name!r}: huggingface_hub is offline (HF_HUB_OFFLINE=1) and it is "
                             "not in the local hub cache; unset HF_HUB_OFFLINE (or download it once), or use a local folder or "
                             "the demo profile (`make run`)") from error
        raise StageError(f"cannot reach the hub for {cfg.model.name!r} ({why}) and it is not in the local hub cache; connect to the "
                         "network (or download it once), or use a local folder or the demo profile (`make run`)") from error
    constants.HF_HUB_OFFLINE = True  # read at each request (`is_offline_mode`), by transformers too
    os.environ["HF_HUB_OFFLINE"] = "1"  # and by the processes this one starts (several ranks' torchrun)
    return [f"hub: cannot reach the hub for {cfg.model.name!r} ({why}); loading it from the local hub cache, with "
            "huggingface_hub offline (HF_HUB_OFFLINE=1) for this run"]  # undone as the run ends (`hub_offline_restored`)


def _why(error: Exception) -> str:
    """`<error class>: <first line>` for a one-line message; for HubAnswered, the class of the hub's error it was raised
    from (RepositoryNotFoundError, GatedRepoError), which says more than HubAnswered."""
    shown = error.__cause__ if isinstance(error, HubAnswered) and error.__cause__ is not None else error
    return f"{type(shown).__name__}: {str(shown).splitlines()[0][:120] if str(shown) else 'no detail'}"


def _section(cfg: PipelineConfig, key: str):
    if key == "model":
        return cfg.model
    if key == "data":
        return cfg.data
    return cfg.data.mix[int(key.split("[")[1].rstrip("]"))]


def _name_key(key: str) -> str:
    return {"model": "model.name", "data": "data.source"}.get(key, f"{key}.source")


def _config_key(key: str) -> str:
    return {"model": "model.revision", "data": "data.revision"}.get(key, f"{key}.revision")


def _read(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
