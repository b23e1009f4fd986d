"""Shared plumbing for stages: content fingerprints, stage folders, atomic writes, locks.

A stage's output folder is `<artifacts>/cache/<stage>/<key>/`, where the key is a content hash of the
stage's inputs. The folder is written under a temporary name and renamed into place, then marked complete
with a `COMPLETE` file, so a crash mid-write never leaves a folder that looks finished (STYLE §6).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

COMPLETE = "COMPLETE"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class StageError(RuntimeError):
    """A stage failed for a reason the user can fix; the message is one line naming the problem and the fix.

    Not retried by Prefect (the same input fails the same way) unless `retryable` is set (e.g. a network error).
    """

    retryable = False


class TrainingStopped(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM, a closed terminal) ended training after it saved a checkpoint: stopped on
    purpose and resumable, so the flow records the run as Cancelled, not Crashed. Still a KeyboardInterrupt: whatever
    stops on Ctrl-C stops on it."""


def fingerprint(*parts: Any, length: int = 16) -> str:
    """Stable short hash of JSON-able parts (dicts are key-sorted), for cache keys."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def user_cache_dir() -> Path | None:
    """This project's folder in the user's cache folder (`$XDG_CACHE_HOME/qlora-pipeline`, else `~/.cache/qlora-pipeline`),
    where memos shared by every artifacts folder live; None when there is none: no HOME and no passwd entry for the user
    (`docker run --user 1234`), where `Path.home()` raises RuntimeError. A relative XDG_CACHE_HOME is ignored, as the XDG
    spec says (it would put the memos in whatever folder a run starts in). A memo only saves work, so without this folder
    everything is computed as if none had been kept."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "qlora-pipeline"
    try:
        return Path.home() / ".cache" / "qlora-pipeline"
    except RuntimeError:
        return None


def hash_memo_dir() -> Path | None:
    """Where `cached_sha256` keeps the digests it computed (`user_cache_dir`); None: nowhere."""
    home = user_cache_dir()
    return home / "sha256" if home else None


def render_memo_dir() -> Path | None:
    """Where tasks/data.py `rendering_fingerprint` keeps the renderings it computed (`user_cache_dir`, beside
    `hash_memo_dir`: shared by every artifacts folder); None: nowhere."""
    home = user_cache_dir()
    return home / "rendering" if home else None


def cached_sha256(path: str | Path) -> str:
    """`file_sha256` of a file, computed once per version of it: remembered in this process and on disk
    (`hash_memo_dir`) under its resolved path, size, mtime, inode and ctime (a rewrite in place changes the ctime, which
    no user can set back). A model's weights are hashed for its cache keys several times a run, and every run: 15 s
    for a 4 GB GGUF each time, and about a minute for a 7B model's folder. A file changed within RACY_NS before its hash
    is not remembered (git's "racily clean" rule): on a filesystem with 1-2 s timestamps (FAT, exFAT, HFS+, some NFS) a
    rewrite in the same second keeps every field of the stamp."""
    real = str(Path(path).resolve())
    stamp = _stamp(real, Path(path).stat())
    if stamp in _digests:
        return _digests[stamp]
    memo = _memo_of(stamp)
    try:
        digest = memo.read_text().partition("\n")[0].strip() if memo else ""  # line 2: the stamp (`prune_hash_memos`)
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            _digests[stamp] = digest
            return digest
    except (OSError, ValueError):  # unreadable or not text: hashed again
        pass
    started = time.time_ns()
    if stamp[1] > 1 << 30:
        _to_stderr(f"hashing {real} ({stamp[1] / 2**30:.1f} GiB) for the cache keys, once per version of the file")
    digest = file_sha256(real)
    _keep_digest(stamp, digest, started)
    return digest


def _stamp(real: str, st: os.stat_result) -> tuple:
    """What `cached_sha256` remembers a digest under: the resolved path, size, mtime, inode and ctime."""
    return (real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _memo_of(stamp: tuple) -> Path | None:
    memos = hash_memo_dir()
    return memos / fingerprint(*stamp, length=32) if memos else None


def _keep_digest(stamp: tuple, digest: str, started_ns: int) -> None:
    """Remember `digest` of the file version `stamp`, hashed from `started_ns` on, in this process and on disk; not when the
    file changed within RACY_NS before that (a rewrite in the same second can keep every field of the stamp)."""
    if max(stamp[2], stamp[4]) >= started_ns - RACY_NS:
        return
    _digests[stamp] = digest
    memo = _memo_of(stamp)
    remember(memo, digest, about=json.dumps(stamp))
    if memo is not None:
        prune_memos_when_due(memo.parent, prune_hash_memos)


def remember(memo: Path | None, digest: str, about: str = "") -> None:
    """Write `digest` to the memo file `memo` atomically (None: there is no cache folder, `user_cache_dir`), with `about`
    on a second line where given (what it is the digest of: `prune_hash_memos` reads it). A memo that cannot be written
    (a read-only home, a full disk) only costs the next run the work again, so that is no error."""
    tmp = None
    if memo is None:
        return
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=memo.parent, delete=False) as f:
            tmp = f.name
            f.write(digest + "\n" + (about + "\n" if about else ""))
        os.replace(tmp, memo)
    except OSError:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


RACY_NS = 3_000_000_000  # `cached_sha256`: files changed this close before their hash are hashed again next time
_digests: dict[tuple, str] = {}

# `cached_sha256`'s memo folder got a file for every version of every file ever hashed (each checkpoint, adapter, merged
# shard and copied artifacts folder), and none left: it only grew. Memos no file can match any more are removed, at most
# once a MEMO_PRUNE_EVERY_S, when a new digest is remembered (a file was just hashed in full: the listing costs far less).
MEMO_PRUNE_EVERY_S = 24 * 3600
# Only memos older than this are looked at: `completion_marker` remembers a build's digests under the folder's final
# place before the build's rename puts the files there, and a prune meanwhile would find them "gone".
MEMO_PRUNE_GRACE_S = 24 * 3600
MEMO_UNTOLD_MAX_AGE_S = 30 * 24 * 3600  # a memo written before memos named their file: removed once this old
# A rendering memo (`render_memo_dir`) names nothing that can be checked (its name is a hash of what the rendering was
# made under: model, template, library versions, code), so it goes once unused this long (`used_memo` marks a use): the
# memos of old library versions and models no longer run. One removed costs the next run that needs it one tokenizer
# load (0.2-2.5 s), once.
RENDER_MEMO_UNUSED_S = 30 * 24 * 3600


def prune_memos_when_due(memos: Path, prune) -> None:
    """`prune(memos)` (`prune_hash_memos`, `prune_render_memos`) if the last one (the mtime of `<memos>.pruned`, beside
    the folder) is MEMO_PRUNE_EVERY_S old or there was none, or it is dated ahead of the clock (touched while the clock ran
    ahead: read as "not due", no prune came again). Called when a new memo is remembered. The stamp is touched first:
    processes remembering memos at once do not all prune."""
    stamp = memos.with_name(memos.name + ".pruned")
    try:
        if 0 <= time.time() - stamp.stat().st_mtime < MEMO_PRUNE_EVERY_S:
            return
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        stamp.touch()
    except OSError:  # a memo folder this user may not write: nothing to prune either
        return
    prune(memos)


def used_memo(memo: Path) -> None:
    """Mark the memo `memo`, just read, as used now (its mtime: `prune_render_memos`), at most once a MEMO_PRUNE_EVERY_S
    (a cached run writes nothing). A memo that cannot be touched (another user's, a read-only home) is left as it is."""
    try:
        if time.time() - memo.stat().st_mtime >= MEMO_PRUNE_EVERY_S:
            os.utime(memo)
    except OSError:
        pass


def prune_render_memos(memos: Path, now: float | None = None) -> int:
    """Remove the rendering memos of `memos` (`render_memo_dir`) unused for RENDER_MEMO_UNUSED_S (`used_memo`), and temp
    files of writes cut off, older than MEMO_PRUNE_GRACE_S. The number removed. Never raises: a memo only saves work."""
    def stale(entry: os.DirEntry, age: float) -> bool:
        return (re.fullmatch(r"[0-9a-f]{32}", entry.name) is not None and age > RENDER_MEMO_UNUSED_S
                or entry.name.startswith("tmp") and age > MEMO_PRUNE_GRACE_S)  # `remember`'s temp file, left by a cut-off write

    return _prune_files(memos, stale, now)


def prune_hash_memos(memos: Path, now: float | None = None) -> int:
    """Remove the memos of `memos` (`cached_sha256`'s folder) that no file can match any more, older than
    MEMO_PRUNE_GRACE_S: those whose file is gone, or has another size, mtime, inode or ctime than the memo's stamp (a memo
    is found by the hash of that stamp, so it could never be read again); those that name no file (written before memos
    did) older than MEMO_UNTOLD_MAX_AGE_S; and temp files of writes cut off. The number removed. Never raises: a memo
    only saves work, and one removed costs at most a file's hash."""
    def stale(entry: os.DirEntry, age: float) -> bool:
        if age < MEMO_PRUNE_GRACE_S:
            return False
        if re.fullmatch(r"[0-9a-f]{32}", entry.name):
            return _memo_stale(Path(entry.path), age)
        return entry.name.startswith("tmp")  # `remember`'s temp file, left by a write that was cut off

    return _prune_files(memos, stale, now)


def _prune_files(memos: Path, stale: Callable[[os.DirEntry, float], bool], now: float | None) -> int:
    """Remove each plain file of the folder `memos` that `stale(entry, age in seconds at `now`)` says should go; the
    number removed. Never raises: a file that cannot be read or removed is left (a memo only saves work)."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(memos))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and stale(entry, now - entry.stat(follow_symlinks=False).st_mtime):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def _memo_stale(memo: Path, age: float) -> bool:
    """Whether no file can match the memo `memo` (`prune_hash_memos`)."""
    try:
        about = memo.read_text(encoding="utf-8").split("\n")[1]
        stamp = tuple(json.loads(about)) if about else None
    except (IndexError, ValueError, UnicodeDecodeError):  # one line (written before memos named their file), or garbage
        stamp = None
    if stamp is None or len(stamp) != 5 or not isinstance(stamp[0], str):
        return age > MEMO_UNTOLD_MAX_AGE_S
    try:
        return _stamp(stamp[0], os.stat(stamp[0])) != stamp
    except OSError:  # gone, or a folder on its path gone
        return True


def folder_fingerprint(folder: str | Path) -> str:
    """Content hash of every file in a folder (relative names + sha256), e.g. a trained adapter: training stops by the
    clock, so one train key can hold different adapters, and evaluate/merge are keyed on what was trained.
    Memoized per (name, size, mtime) of the files: cache-key functions call it several times per run."""
    folder = Path(folder)
    files = sorted(_files_under(folder)) if folder.is_dir() else [folder] if folder.is_file() else []
    stamp = tuple((str(p.relative_to(folder)) if p != folder else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _folder_hash(str(folder), stamp)


def _files_under(folder: Path) -> list[Path]:
    """Every file below `folder`, through symlinked folders too (a reader such as pandas follows them; rglob does not),
    each real folder once (a link back up would loop)."""
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [p for p in (Path(root) / n for n in names) if p.is_file()]
    return found


@functools.lru_cache(maxsize=32)
def _folder_hash(folder: str, stamp: tuple) -> str:
    if not stamp:
        return "missing"
    root = Path(folder)
    return fingerprint("folder", [(rel, file_sha256(root if root.is_file() else root / rel)) for rel, _, _ in stamp])


def artifacts_root(artifacts_dir: str) -> Path:
    """The artifacts folder, absolute; relative paths are taken from the project root."""
    p = Path(artifacts_dir)
    return p if p.is_absolute() else PROJECT_ROOT / p


def writable_problem(artifacts_dir: str) -> str | None:
    """None if the artifacts folder can be created and written to, else one line naming the problem and the fix."""
    root = artifacts_root(artifacts_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as e:
        return (f"artifacts_dir {str(root)!r} is not writable ({e.strerror or type(e).__name__}); "
                "pass --set artifacts_dir=<a folder you can write to>")
    return None


def disk_full(e: BaseException) -> bool:
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def safe_name(name: str, what: str = "name") -> str:
    """A run/profile/repo name made safe to use as one path component (no '..', no separators)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    if not cleaned or cleaned in {".", ".."}:
        raise StageError(f"{what} {name!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return cleaned[:120]


def stage_dir(artifacts_dir: str, stage: str, key: str) -> Path:
    return artifacts_root(artifacts_dir) / "cache" / stage / key


def is_complete(path: Path) -> bool:
    if not path.exists():
        remove_dead_builds(path.parent, path.name)  # a build killed between `building`'s two renames: the folder comes back
    return (path / COMPLETE).is_file()


def read_record(out: Path) -> dict[str, Any]:
    """The record.json of the complete stage folder `out`, its paths pointing where the folder is now (`at_home`)."""
    return at_home(read_json(out / "record.json"), out)


def safetensors_whole(path: Path) -> bool:
    """`path` is a whole safetensors file: safetensors reads its header and checks that the file is as long as the header
    says (only the header is read). A file cut short (a copy or a disk that ran out, emptied to save space) passed a
    "file is there" check and failed later as safetensors' bare "header too small", naming neither the stage folder nor
    the fix. As publish's `require_safetensors` checks the published weights."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np"):
            return True
    except Exception:  # safetensors' own SafetensorError, an OSError: not whole
        return False


REBUILD = "delete that folder and rerun the same command to build it again"  # the fix for a complete folder with files gone


def completion_marker(folder: Path, record_files: bool, leave_out: tuple[str, ...] = (), home: Path | None = None) -> str:
    """The text of `folder`'s COMPLETE marker: when it was completed, and with `record_files` each file's size and
    sha256 (JSON), which `changed_file` compares; files whose path in the folder starts with one of `leave_out` are not
    listed (a stage's scratch: training's checkpoints and torchrun logs in work/). Sizes alone missed a file whose bytes
    were changed in place; a size and mtime would refuse every copied or moved artifacts folder (a copy gets new mtimes).

    Each file is hashed once here, in full, and its digest remembered (`cached_sha256`'s memo) for where it will be read:
    `home`, the folder's final place (a build's temp folder is renamed there; a rename of the folder keeps each file's
    inode, mtime and ctime), else `folder`. A later check then reads each file's size and, unless the file changed, was
    copied or the memo is gone, no byte of it: sha256 runs at ~1.3 GB/s on an idle 2-core box (0.35-0.88 GB/s loaded;
    blake2b 0.85 GB/s), so a 14 GB merged 7B model costs 11-40 s at its build, where hashing it at every cache hit would
    cost that every run; a hit costs ~1 ms (bench/marker_hash_cost.py; docs/RELIABILITY.md, "a complete stage folder's file")."""
    done = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not record_files:
        return done + "\n"
    home = (home.parent.resolve() / home.name) if home is not None else folder.resolve()
    files = {}
    for p in sorted(_files_under(folder)):
        rel = p.relative_to(folder).as_posix()
        if rel.startswith(leave_out) or _is_temp_file(p.name):
            continue
        try:
            _out_of_the_racy_window(p)
            st, started = p.stat(), time.time_ns()
            digest = file_sha256(p)
        except FileNotFoundError:  # gone since the walk: a concurrent run's renamed temp file (a folder of parts it shares)
            continue
        _keep_digest(_stamp(str(home / rel), st), digest, started)
        files[rel] = {"size": st.st_size, "sha256": digest}
    return json.dumps({"completed": done, "files": files}, indent=1, sort_keys=True) + "\n"


def _is_temp_file(name: str) -> bool:
    """`name` is a `write_text` temp file (`.<name>.<random>.tmp`): a write under way (a run sharing the folder) or one a
    kill cut off, never an output, so never listed (the first was renamed away before its stat)."""
    return name.startswith(".") and name.endswith(".tmp")


# A file at least this big written within RACY_NS before `completion_marker` hashes it is hashed once that time has passed,
# not at once: hashed at once, its digest is not remembered (`_keep_digest`: a coarse clock could keep its stamp through a
# rewrite), and the first cache hit after the build hashed it again in full. That is a real cost where a build's weights
# are saved right before its marker (a converted or `random:` model's folder, a merged model whose check is quick):
# bench/marker_hash_cost.py, 1 GiB on this 2-core box under load, 2026-12-07: hashed at once, the build's marker 3.3 s and
# the first hit 3,310 ms; waiting, the marker 5.0 s and the first hit 0.16 ms. The wait costs at most RACY_NS, once (the
# files hashed meanwhile count towards it); hashing again costs 0.8-3 s per GiB (0.35-1.3 GB/s): from 4 GiB on, the wait
# is the cheaper whatever the load, and smaller files are left to be hashed again at the first hit.
RACY_WAIT_BYTES = 4 << 30


def _out_of_the_racy_window(path: Path) -> None:
    """Sleep until `path`, if it has RACY_WAIT_BYTES or more, last changed more than RACY_NS ago (`RACY_WAIT_BYTES`). A
    stamp ahead of this machine's clock (an NFS server whose clock runs ahead, a tar made on a skewed machine) is not
    waited for: that wait had no bound (an hour ahead, an hour's sleep with no line said); the file is hashed at once and
    its digest not remembered (`_keep_digest`), as before the wait."""
    st = path.stat()
    if st.st_size >= RACY_WAIT_BYTES:
        wait_ns = max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS - time.time_ns()
        if 0 < wait_ns <= RACY_NS:
            time.sleep(wait_ns / 1e9 + 0.01)


def mark_folder_complete(folder: Path, record_files: bool = False, leave_out: tuple[str, ...] = ()) -> None:
    """Write the COMPLETE marker (`completion_marker`) of `folder`, a stage folder built in place (training's: it resumes
    from its checkpoints there), atomically: a marker cut short by a crash would read as a damaged folder and cost its
    rebuild (hours of training). A folder built by `building` is marked before its rename instead."""
    write_text(folder / COMPLETE, completion_marker(folder, record_files, leave_out))


def changed_file(out: Path) -> str | None:
    """How the first file the COMPLETE marker of `out` lists differs from when the folder was completed (gone, another
    size, other bytes), as the end of "<out> is marked complete but ..."; None when every file is as it was, or the
    marker lists none (a stage that does not record them, a folder completed before markers did). An arrow file or chart
    cut short, or bytes changed in place, passed the "file is there" checks and was trained or published as it was."""
    files = _listed_files(out, COMPLETE)
    if files is None or isinstance(files, str):
        return files
    for rel, (size, digest) in sorted(files.items()):
        changed = _file_change(out, rel, size, digest, "when the folder was completed")
        if changed:
            return changed
    return None


def listed_change(out: Path, rel: str, listing: str = COMPLETE) -> str | None:
    """How the file `rel` of `out` differs from what the file list `listing` of `out` (a `completion_marker` text: its
    COMPLETE marker, or PARTS, the list a folder of resumable parts keeps, `list_parts`) says of it, as `changed_file`
    words it; None when it is as listed, or the list does not name it (no list, a plain timestamp marker)."""
    if not (out / listing).exists():
        return None
    files = _listed_files(out, listing)
    if files is None or isinstance(files, str):
        return files
    return _file_change(out, rel, *files[rel], f"when {listing} listed it") if rel in files else None


def is_listed(out: Path, rel: str, listings: tuple[str, ...]) -> bool:
    """Whether one of the file lists `listings` of `out` (`completion_marker` texts: COMPLETE, PARTS) names the file `rel`."""
    return any(isinstance(files := _listed_files(out, name), dict) and rel in files for name in listings if (out / name).is_file())


PARTS = "PARTS"  # a folder of resumable parts (stage 5's saved passes): each part's size and sha256 as it was saved


def list_parts(folder: Path, part: str) -> None:
    """List the part `part` of `folder`, just saved, in its PARTS list (`completion_marker`'s form) with its size and
    sha256, every other entry as it was listed (PARTS' entries, then the folder's COMPLETE marker's for parts PARTS does
    not name; the marker is removed: the folder is not complete again until every part is in, and the marker lists the
    part's old bytes). COMPLETE's entries are kept: a folder a previous version completed lists every part in COMPLETE
    and only those it saved itself in PARTS (the rest saved by a version before parts were listed), and a part no list
    names is generated again (evaluate `_read_side`): hours on a 7B, for parts COMPLETE vouched for. A part cut short or
    edited since it was saved is then told from one as saved (`listed_change`) before its folder is complete, and a resumed run
    redoes it instead of reusing it. Only the saved part is hashed: rebuilt from the folder as it was, the list took
    every other part's bytes for saved ones, so a part edited since it was listed was reused once the run had saved any
    other, and a concurrent run's temp file was listed, then gone before its stat (FileNotFoundError ended stage 5).
    Read, changed and written (atomically) under a flock of the folder (`_folder_flocked`): two runs sharing the folder
    keep each other's entries."""
    with _folder_flocked(folder):
        files = {}
        for name in (COMPLETE, PARTS):  # where both name a part, PARTS' entry wins: the part as it was saved
            listed = _listed_files(folder, name) if (folder / name).is_file() else None
            files |= {rel: {"size": size, "sha256": digest} for rel, (size, digest) in (listed if isinstance(listed, dict) else {}).items()}
        files[part] = {"size": (folder / part).stat().st_size, "sha256": file_sha256(folder / part)}
        text = json.dumps({"completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}, indent=1, sort_keys=True)
        write_text(folder / PARTS, text + "\n")
        (folder / COMPLETE).unlink(missing_ok=True)


def mark_parts_complete(folder: Path, parts: list[str]) -> str | None:
    """Write the COMPLETE marker of `folder`, a folder of parts (`list_parts`), listing each of `parts` as its PARTS entry
    says it was saved, not as the folder holds it now; None when written, else why not (as `changed_file` words it), and
    nothing is written: a part not listed, or whose bytes differ from its entry. Marked from the folder's bytes at the end
    of the stage, a part edited or replaced after it was saved (by hand, by a copy, by a run of older code) was listed as
    if saved so. Under the flock `list_parts` takes: a part another run saves meanwhile is listed, or the marker removed."""
    with _folder_flocked(folder):
        listed = _listed_files(folder, PARTS) if (folder / PARTS).is_file() else f"it has no {PARTS} list"
        if not isinstance(listed, dict):
            return listed or f"its {PARTS} list names no file"
        files = {}
        for part in parts:
            if part not in listed:
                return f"its file {part} is not in its {PARTS} list"
            changed = _file_change(folder, part, *listed[part], f"when {PARTS} listed it")
            if changed:
                return changed
            files[part] = {"size": listed[part][0], "sha256": listed[part][1]}
        text = json.dumps({"completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}, indent=1, sort_keys=True)
        write_text(folder / COMPLETE, text + "\n")
    return None


@contextlib.contextmanager
def _folder_flocked(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock of the folder itself (no lock file: the folder's files are its parts and their lists, which
    tests and readers take as the whole). Where the filesystem refuses flock (some network or FUSE ones), unlocked: two
    runs saving at once may then drop an entry, and the next run that reads that part generates it again (evaluate
    `_read_side`: a part no list names is not read back unchecked)."""
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _listed_files(out: Path, listing: str) -> dict[str, tuple[int, str]] | str | None:
    """{file: (size, sha256)} of the `completion_marker` text `out / listing`; None for a plain timestamp; a str: why
    it cannot be read."""
    try:
        text = (out / listing).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return f"its {listing} marker cannot be read ({type(e).__name__})"
    if not text.startswith("{"):  # a plain timestamp: no files recorded
        return None
    try:
        return {str(rel): (int(f["size"]), str(f["sha256"])) for rel, f in json.loads(text)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {listing} marker is not the file list it was written as (cut short or edited)"


def _file_change(out: Path, rel: str, size: int, digest: str, when: str) -> str | None:
    path = out / rel
    try:
        now = path.stat().st_size
    except OSError:
        return f"its file {rel} is gone"
    if now != size:
        return f"its file {rel} is {now:,} bytes, {size:,} {when} (cut short or rewritten)"
    if cached_sha256(path) != digest:
        return f"its file {rel} has other bytes than {when} (changed in place)"
    return None


def complete_record(out: Path, record_type: Any) -> Any:
    """The record of the complete stage folder `out` as `record_type` (`read_record`). A folder marked complete whose
    record cannot be read, whose files differ from those its marker lists (`changed_file`: an arrow file cut short, bytes
    changed in place), or whose outputs are gone (`outputs_exist`: an adapter deleted to save space, a copy cut
    short), is a StageError naming it and the fix: it was handed on as it was, and a later stage failed on a raw
    JSONDecodeError or PEFT's "Can't find 'adapter_config.json'" that named neither."""
    try:
        record = record_type.model_validate(read_record(out))
    except (OSError, ValueError) as e:  # a pydantic ValidationError is a ValueError
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StageError(f"{out} is marked complete but its record.json cannot be read ({why}); {REBUILD}") from e
    changed = changed_file(out)
    if changed:
        raise StageError(f"{out} is marked complete but {changed}; {REBUILD}")
    if not record.outputs_exist():
        raise StageError(f"{out} is marked complete but some of its files are gone; {REBUILD}")
    return record


def at_home(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """`record` (a stage's, written into `<root>/cache/<stage>/<key>/`) with every path under the artifacts folder it was
    written in moved to the one that holds `out` now. Records keep absolute paths (their folder's files, the model under
    cache/models/): an artifacts folder moved, copied or renamed with its checkout would otherwise hand the next stages the
    old place, so a run read another folder's files and published into its runs/, or failed on a missing file once the
    old folder was gone."""
    old = record.get("dir")
    if not isinstance(old, str) or Path(old) == out or Path(old).name != out.name or Path(old).parent.parent.name != "cache":
        return record
    was, now = str(Path(old).parent.parent.parent), str(out.parent.parent.parent)

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value == was or value.startswith(was + os.sep)):
            return now + value[len(was):]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        return value

    return moved(record)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def write_text(path: Path, text: str) -> None:
    """Write `text` atomically (temp file in the same folder, synced, then renamed): whole or not there after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_msg(e: json.JSONDecodeError) -> str:
    """json's message without its dangling "at" ("Unterminated string starting at", "Invalid control character at"),
    whose position str(e) appends: the callers name the line and column themselves."""
    return e.msg.removesuffix(" at")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def building(final: Path, mark_complete: bool = True, record_files: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder next to `final`; on success move it into place (marked complete, unless the
    folder has its own completeness record, like a published run's manifest). `record_files`: the marker also lists
    each file's size and sha256, which `changed_file` checks on every later read (`completion_marker`).

    On failure the temp folder is removed and `final` (if a complete one existed) is untouched. For the whole build the
    builder holds the flock of a lock file beside the temp folder (`_start_build`), which tells a later build of any
    process space (another container on the same volume) whether this one is still alive (`remove_dead_builds`).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(final.parent, final.name)
    tmp, lock, lock_fd = _start_build(final)
    old = None
    try:
        yield tmp
        if mark_complete:  # not seen under `final` until the rename: a plain write is whole or gone with the temp folder
            (tmp / COMPLETE).write_text(completion_marker(tmp, record_files, home=final), encoding="utf-8")
        if final.exists():
            # Two renames, then the slow delete: `final` is missing for microseconds, not for an rmtree of gigabytes,
            # and a crash in between leaves the old folder whole next to it (`.<name>.old-<builder>-*`, the temp
            # folder's suffix, so the same lock file speaks for it), which the next look at `final` puts back
            # (`remove_dead_builds`).
            old = final.parent / _build_folder(final.name, "old", tmp)
            os.mkdir(old, 0o700)
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _end_build(tmp, old, lock, lock_fd)


_HELD_BUILD_LOCKS: set[tuple[int, int]] = set()  # (device, inode) of the build lock files this process holds: its own
                                                  # looks never open them (`_dead_builders_lock`)


def _build_folder(name: str, kind: str, tmp: Path) -> str:
    """The `kind` file of the build whose temp folder is `tmp` (`.<name>.tmp-<builder>-<suffix>`): its folder moved
    aside ("old") or its lock file ("lck", as long as "tmp": a temp folder name that fits NAME_MAX fits for both), named `.<name>.<kind>-<builder>-<suffix>`: same builder, same suffix. The
    lock file sits beside the temp folder, never inside (the folder is renamed into place), and is not named `.tmp-*`:
    it speaks for both folders, and a look for leftover temp folders does not take it for one."""
    return f".{name}.{kind}-" + tmp.name[len(f".{name}.tmp-"):]


BUILD_LOCK_TRIES = 5  # `_start_build`: lock files taken by a checker (or refused by flock) before building without one


def _start_build(final: Path) -> tuple[Path, Path, int | None]:
    """A new temp folder for `final` (`.<name>.tmp-<builder>-<suffix>`), its lock file (`.<name>.lck-<builder>-<suffix>`)
    and the descriptor holding that file's flock, or None where the filesystem has no flock (the folder is then judged by
    its pid, as folders were before lock files).

    Ordering, so that a build never finds its own temp folder removed: the lock file is created (O_EXCL) and locked, and
    checked to still be the file at its name, BEFORE the folder is made; it is unlinked only after the temp folder and the
    `.old-*` one are gone, and unlocked after that (`_end_build`). A checker removes or puts back a build's folders only
    while it holds the flock of the file linked at that build's lock name (`_dead_builders_lock`), and unlinks the lock
    file only after the folders, still holding it. So while a folder of this build exists, this process holds that flock
    and no checker can. A checker that takes the lock in the instant between its creation and this flock (an orphan: no
    folder yet) unlinks it; this flock then fails or lands on the unlinked file, the check below sees it, and this build
    starts over under a new name, its folder never made under a lock someone else held. After `BUILD_LOCK_TRIES` such
    refusals it goes on without a lock file (the pid rule, as where the filesystem has no flock): a filesystem whose flock
    refuses every time (some network or FUSE ones answer EACCES) would otherwise keep it from ever building."""
    refused = 0
    while True:
        tmp = final.parent / f".{final.name}.tmp-{_builder()}-{secrets.token_hex(4)}"
        lock = tmp.with_name(_build_folder(final.name, "lck", tmp))
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            lock.unlink(missing_ok=True)
            refused += 1
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES) and refused < BUILD_LOCK_TRIES:  # a checker took
                continue                                                                                 # it: a new name
            fd = None  # no flock on this filesystem (some network ones): no lock file, the pid rule as before
        else:
            if _still_linked(fd, lock):
                _HELD_BUILD_LOCKS.add(_file_id(os.fstat(fd)))
            else:  # a checker unlinked it before this flock landed: a new name
                os.close(fd)
                fd = None
                refused += 1
                if refused < BUILD_LOCK_TRIES:
                    continue
        try:
            if fd is not None:  # for a person who finds it
                os.write(fd, f"pid {os.getpid()} in process space {process_space()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
            os.mkdir(tmp, 0o700)  # mkdtemp's mode, as before
        except BaseException as e:
            _end_build(tmp, None, lock, fd)
            if isinstance(e, FileExistsError):  # a lockless folder of that very name (an old version's): a new name
                continue
            raise
        return tmp, lock, fd


def _end_build(tmp: Path, old: Path | None, lock: Path, fd: int | None) -> None:
    """Let go of a build's lock (`_start_build`): its file is unlinked once no folder of the build is left, then the flock
    is released (closing drops it). A folder left (a failure between the two renames left the old one aside, an rmtree
    that could not finish) keeps its lock file, unlocked: any later look takes it and puts back or removes that folder."""
    if fd is None:
        return
    try:
        if not _folder_left(tmp) and not (old is not None and _folder_left(old)):
            with contextlib.suppress(OSError):  # left for a later look, as when a folder is
                lock.unlink(missing_ok=True)
    finally:
        _HELD_BUILD_LOCKS.discard(_file_id(os.fstat(fd)))
        os.close(fd)


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _still_linked(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not unlinked or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def process_space() -> str:
    """Where this process's pid means something: the host, and its PID namespace where there is one to read (Linux). A
    container sharing the host's name (host network, `--uts=host`) and the artifacts folder numbers its processes apart,
    so a pid of another namespace says nothing here: one namespace's build took another's live one for dead and removed
    it mid-build, and a live run of another namespace was marked crashed."""
    host = re.sub(r'[^A-Za-z0-9_.-]+', '_', socket.gethostname())
    try:
        ns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        ns = ""
    return f"{host}_pidns{ns}" if ns else host


def _builder() -> str:
    """This process in a temp folder's name (`building`): its process space and pid, so a later build can tell a dead one's."""
    return f"{process_space()}-{os.getpid()}"


def remove_dead_builds(parent: Path, name: str | None = None) -> None:
    """Temp folders in `parent` (of `name`, or of any folder) left by a builder that is gone (kill -9, power loss, the OOM
    killer, `docker kill`: `building`'s cleanup never ran). A rerun builds in a new one, so each crash left its partial
    copy for good: a merged 7B model is 14 GB (28 in fp32), and every killed merge or publish kept one. A build killed
    between `building`'s two renames left the folder it replaced aside (`.<name>.old-<builder>-*`) and none in place:
    that one is put back.

    A builder is judged by its lock file (`.<name>.lck-<builder>-*`, `_start_build`), whatever its process space: the kernel
    drops a dead process's flock, so a lock taken here without waiting means its builder is gone (its folders are
    removed or put back while holding it, then the lock file goes); one held is a live build (another container's
    on the same volume), left alone. Folders without a lock file (made before lock files, or where the filesystem has no
    flock) keep the pid rule: removed when their pid is gone in this process space; another space's pid says nothing
    here, so theirs are left alone, as are temp folders named before the builder was in the name.

    Caveat: this trusts flock to be shared by everyone who sees the folder. It is on one kernel (containers sharing a
    volume or bind mount) and on NFS with working lock managers (Linux maps flock to NFS byte-range locks; a crashed
    client's locks are freed only when its lease ends, so its folders wait for that). It is NOT on a mount whose flock is
    local to each client (NFS `local_lock=flock` or `local_lock=all`, some FUSE and SMB mounts): there a live build of
    another machine looks dead, so do not share one artifacts folder between machines over such a mount. A builder's
    forked children (data workers) share its lock: its folders count as live until they exit too.

    A look never raises (it runs inside `is_complete` and before every build): a step refused (another user's 0700
    `.old-*` folder it may not enter, a lock file in a folder it may not write) leaves that build for a later look."""
    space = process_space()
    prefix = f".{name}." if name is not None else "."
    try:
        with os.scandir(parent) as listing:
            entries = {e.name: _entry_is_dir(e) for e in listing if e.name.startswith(prefix)}  # name -> is a folder
    except OSError:  # gone, or not readable: nothing this look can do
        return
    builds: dict[str, set[tuple[str, str]]] = {}  # lock file name -> the builds it may speak for: (final name, builder-suffix)
    for entry, is_dir in sorted(entries.items()):
        splits = [(final, rest) for final, kind, rest in _build_name_splits(entry, name) if (kind != "lck") == is_dir]
        if is_dir:  # a folder: the build whose lock file is there, else one of this process space (the pid rule)
            splits = ([(f, r) for f, r in splits if f".{f}.lck-{r}" in entries]
                      or [(f, r) for f, r in splits if _BUILDER_SUFFIX.fullmatch(r)["space"] == space])
        for final, rest in splits:
            builds.setdefault(f".{final}.lck-{rest}", set()).add((final, rest))
    for lock_name, ids in sorted(builds.items()):
        lock = parent / lock_name
        with _dead_builders_lock(lock) as gone:
            if gone is False:  # a live build, or one that cannot be told: left alone
                continue
            if gone is None:  # no lock file: the pid rule
                ids = {(f, r) for f, r in ids if _pid_gone_here(r)}
            # Listed again by name now that its builder is known gone: one alive at the listing above may have made a
            # folder since (its `.old-*` one) before it died, which would otherwise be left without its lock file.
            folders = [(kind, parent / f".{final}.{kind}-{rest}", final) for final, rest in sorted(ids) for kind in ("tmp", "old")]
            folders = [f for f in folders if _folder_left(f[1])]
            _remove_dead_build(parent, folders)
            if gone and not any(_folder_left(f[1]) for f in folders):  # still holding it: the lock file goes last
                with contextlib.suppress(OSError):  # may not (another user's file in a sticky folder): a later look
                    lock.unlink(missing_ok=True)


_BUILDER_SUFFIX = re.compile(r"(?P<space>.+)-(?P<pid>\d+)-(?P<suffix>[A-Za-z0-9_]+)")  # after `.<name>.<kind>-`


def _build_name_splits(entry: str, name: str | None) -> list[tuple[str, str, str]]:
    """Each way to read `entry` as a build's file `.<final>.<kind>-<space>-<pid>-<suffix>` (kind tmp, old or lck), as
    (final, kind, `<space>-<pid>-<suffix>`); where `name` is given, only the one whose final name it is. A process space
    may itself hold `.tmp-`, `.old-` or `.lck-` (a host name such as `app.old-dc`), so without a name there can be several:
    `remove_dead_builds` keeps the one whose lock file is there."""
    if not entry.startswith("."):
        return []
    splits = []
    for m in re.finditer(r"\.(tmp|old|lck)-", entry):
        final, rest = entry[1:m.start()], entry[m.end():]
        if final and (name is None or final == name) and _BUILDER_SUFFIX.fullmatch(rest):
            splits.append((final, m[1], rest))
    return splits


def _pid_gone_here(builder_suffix: str) -> bool:
    """Whether the builder of `<space>-<pid>-<suffix>` is known gone: of this process space and its pid gone (another
    space's pid says nothing here), as a run record's process is judged."""
    m = _BUILDER_SUFFIX.fullmatch(builder_suffix)
    return recorded_process_gone(int(m["pid"]), None, m["space"])


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _remove_dead_build(parent: Path, folders: list[tuple[str, Path, str]]) -> None:
    """Put back the folder a dead build moved aside (its `.old-*` one, if nothing stands in its place) and remove the rest."""
    for kind, p, final_name in folders:
        if kind == "old":  # killed between the two renames: the folder it moved aside goes back
            final = parent / final_name
            try:
                if not final.exists() and (p / final_name).is_dir():
                    os.replace(p / final_name, final)
            except OSError:  # another user's 0700 folder, read-only, or another look put it back first: for a later look
                continue
        shutil.rmtree(p, ignore_errors=True)


def _folder_left(p: Path) -> bool:
    """Whether build folder `p` is still there; True where that cannot be told (its lock file then stays for a later look)."""
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


@contextlib.contextmanager
def _dead_builders_lock(lock: Path) -> Iterator[bool | None]:
    """Inside: None where `lock` does not exist (a build without a lock file), False while its builder lives (or where
    it cannot be told: unreadable, no flock here), True holding the flock of a gone builder's lock file, which is still
    the file at its name (not one a finishing build or another look unlinked after this one opened it). Opened for
    writing where it may be (NFS grants flock's exclusive lock only then), else read-only (a lock file of another
    container's user, on a local filesystem)."""
    fd = None
    try:
        if _file_id(os.stat(lock, follow_symlinks=False)) in _HELD_BUILD_LOCKS:  # this process's own build (whatever path
            gone = False  # names it), never opened here: on NFS, closing a second descriptor drops the process's own lock
        else:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except PermissionError:
                fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            gone = _still_linked(fd, lock)
    except FileNotFoundError:
        gone = None
    except OSError:  # held: a live build; or unreadable, or no flock here: cannot be told
        gone = False
    try:
        yield gone
    finally:
        if fd is not None:
            os.close(fd)


def recorded_process_gone(pid: Any, host: Any, space: Any) -> bool:
    """Whether the process a record names (pid, host name, `process_space`) is known to be gone: its pid is judged only in
    its own process space (a record written before the space was recorded: by host name), so another machine's or PID
    namespace's process is never taken for dead."""
    here = space == process_space() if space else host == socket.gethostname()
    return bool(here) and isinstance(pid, int) and not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # a pid no process can have (a corrupt record): not alive
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked(path: Path, timeout: float = -1, log_fn=None) -> Iterator[None]:
    """Inter-process lock on `path`.lock: two runs sharing artifacts/ never build the same folder at once.

    Held by another process, one line (`log_fn`, else stderr) names the folder and the holder and says this run waits:
    a second identical run otherwise sat silent for the hours the first one trained, then reused its result. Whoever
    takes the lock records itself (pid, host, since when) in `path`.lock.holder for that line, and removes it on release.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(str(path) + ".lock", timeout=timeout), Path(str(path) + ".lock.holder")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        (log_fn or _to_stderr)(f"{path}: locked by {_lock_holder(holder)}, building it; this run waits for it, then uses what it "
                               "built (or builds it, if that run stops first)")
        lock.acquire()
    try:
        holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')} "
                          f"(process space {process_space()})\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _lock_holder(holder: Path) -> str:
    """Who holds a lock, as it recorded itself (`locked`); a record of a process of this machine that is gone is stale
    (the holder was killed before removing it, and the one holding the lock now has not written its own yet)."""
    try:
        text = holder.read_text().strip()
    except OSError:
        text = ""
    m = re.fullmatch(r"pid (\d+) on (\S+) since .*?(?: \(process space (\S+)\))?", text)
    if not m or recorded_process_gone(int(m.group(1)), m.group(2), m.group(3)):
        return "another process (not recorded yet)"
    return text


def _to_stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def stop_when_orphaned(parent: int, grace_s: float = 10.0) -> None:
    """A watchdog thread for a server started by `parent`: once this process has another parent (`parent` died, even
    by SIGKILL or a closed terminal, and this process was re-parented), SIGTERM to itself (a graceful stop), then a hard
    exit if that has not ended it in `grace_s`: no orphaned server holding its port."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


@contextlib.contextmanager
def transformers_logs_at_error() -> Iterator[None]:
    """transformers' log level at error for the block (its per-load and per-config chatter; we log once per stage)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or `taskset`'s share), not the machine's."""
    return max(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 1)


# A bar redraws up to 10 times a second. On a terminal that rewrites one line; in a log (Prefect's, CI's, `make run > log`)
# every redraw stays, a line each. Off a terminal a bar draws at most once this often (and when it starts, changes part
# or closes).
BAR_INTERVAL_OFF_TTY_S = 30.0


def progress_bar(**kwargs):
    """A tqdm bar (`tqdm.auto`'s; `kwargs` are tqdm's) that draws at most every BAR_INTERVAL_OFF_TTY_S seconds when its
    stream (`file`, default stderr) is not a terminal; tqdm's own rate on one, or where TQDM_MININTERVAL says. It draws
    when it starts whatever TQDM_DELAY says (`quiet_library_bars` sets that for the libraries' bars, not the stages').
    Close it in a `finally`: an exception would leave it half drawn, and the next bar a line lower."""
    import sys

    from tqdm.auto import tqdm

    kwargs.setdefault("delay", 0)
    if "TQDM_MININTERVAL" in os.environ:
        # tqdm reads TQDM_* once, when first imported; the CLI (or a user's shell after an import) may set it later.
        for name, key in (("TQDM_MININTERVAL", "mininterval"), ("TQDM_MAXINTERVAL", "maxinterval")):
            try:
                kwargs.setdefault(key, float(os.environ[name]))
            except (KeyError, ValueError):
                pass
    elif not _is_terminal(kwargs.get("file") or sys.stderr):
        kwargs.setdefault("mininterval", BAR_INTERVAL_OFF_TTY_S)
        kwargs.setdefault("maxinterval", BAR_INTERVAL_OFF_TTY_S)  # tqdm's monitor would otherwise force a draw every 10 s
    return tqdm(**kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


LIBRARY_BAR_SETTINGS = ("TQDM_MININTERVAL", "TQDM_MAXINTERVAL", "TQDM_DELAY")


def quiet_library_bars() -> None:
    """Off a terminal (stderr a pipe or a file: Prefect's worker, CI, `make run > log`), the libraries' own tqdm bars (the
    hub's downloads, transformers' "Loading weights" and "Writing model shards", datasets' map and save) draw like the
    stages' bars: not at all when they end within BAR_INTERVAL_OFF_TTY_S (tqdm's `delay`: loading a small model, writing
    its shards), else once per interval with their ETA, and when they close. They drew every 0.1 s, a log line each.
    tqdm reads these defaults from TQDM_MININTERVAL / TQDM_MAXINTERVAL / TQDM_DELAY once, when it is first imported: the
    CLI calls this first thing, before anything imports tqdm, and the processes it starts (torchrun's workers, Prefect's
    flow runs) inherit them. A value the user set wins; on a terminal nothing changes."""
    import sys

    if _is_terminal(sys.stderr):
        return
    for name in LIBRARY_BAR_SETTINGS:
        os.environ.setdefault(name, str(BAR_INTERVAL_OFF_TTY_S))


def human_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


FAULT_ENV = "QLORA_PIPELINE_FAULT"
_fault_calls: dict[str, int] = {}  # maybe_fault calls per stage in this process (for `oom@K`)


FAULT_ARGS = {"sleep": ("sleep@S (S: seconds, a number >= 0, e.g. sleep@2.5)", lambda a: 0 <= float(a) < 1e9),
              "oom": ("oom or oom@K (K: calls, an integer >= 1, e.g. oom@2)", lambda a: a == "" or int(a) >= 1),
              "nan": ("nan@N (N: the step, an integer >= 1, e.g. nan@3)", lambda a: int(a) >= 1),
              "": ("kill, hang, oom[@K], sleep@S, nan@N, or nothing after the stage name (a crash)", lambda a: a == ""),
              "kill": ("kill (no argument)", lambda a: a == ""),
              "hang": ("hang (no argument)", lambda a: a == "")}


def _faults(stage: str) -> Iterator[tuple[str, str]]:
    """(kind, argument) of every `<stage>:<kind>[@<arg>]` item of QLORA_PIPELINE_FAULT naming this stage; a ValueError
    naming the item for an argument its kind cannot take (FAULT_ARGS)."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, spec = item.strip().partition(":")
        if name == stage:
            kind, _, arg = spec.partition("@")
            form, fits = FAULT_ARGS.get(kind, (f"<kind>, one of {', '.join(filter(None, FAULT_ARGS))} or none", lambda a: False))
            try:
                ok = fits(arg)
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{FAULT_ENV} item {item.strip()!r} is not a fault this switch takes: write <stage>:{form}")
            yield kind, arg


def maybe_fault(stage: str) -> None:
    """Test-only fault injection, called at the start of each stage (docs/RELIABILITY.md; never set it outside
    tests). `QLORA_PIPELINE_FAULT=<stage>[:<kind>],...` where kind is:

    (none)  raise RuntimeError (an unexpected crash);   kill   SIGKILL this process (power loss, OOM killer);
    oom     raise torch.OutOfMemoryError every time;   oom@K  only the first K calls in this process;
    sleep@S sleep S seconds: a window a test's signal lands in (`after-<stage>`: the flow between that stage and the next);
    hang    stuck for an hour with the stop signals ignored, its connections to the other ranks kept, as in native
            code (an NCCL collective, a CUDA kernel), where Python's signal handlers do not run: a stop that never
            ends; only SIGKILL ends it. It says so on stderr first (a test waits for that line).
    `train:nan@N` is not raised here: the training loop turns the weights NaN at step N (`fault_arg`).
    """
    calls = _fault_calls[stage] = _fault_calls.get(stage, 0) + 1
    for kind, arg in _faults(stage):
        if kind == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            import signal
            import sys

            # Ignored by the whole process, not blocked in this thread: a signal blocked here only went to another
            # thread, and the rank ended on the first stop (closing its connection) instead of staying stuck.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            print(f"{FAULT_ENV}: {stage} hangs, the stop signals ignored", file=sys.stderr, flush=True)
            time.sleep(3600)
        if kind == "oom" and (not arg or calls <= int(arg)):
            import torch

            raise torch.OutOfMemoryError(f"injected out-of-memory in {stage} ({FAULT_ENV})")
        if kind == "sleep":
            time.sleep(float(arg))
        if kind == "":
            raise RuntimeError(f"injected failure in stage {stage} ({FAULT_ENV}={os.environ.get(FAULT_ENV)})")


def fault_arg(stage: str, kind: str) -> str | None:
    """The argument of a test-only `<stage>:<kind>@<arg>` fault if one is set (e.g. `train:nan@3` -> "3")."""
    return next((arg for k, arg in _faults(stage) if k == kind), None)


def off_the_lost_terminal() -> None:
    """Point stdout and stderr that are a terminal at /dev/null (the progress bar and the log lines would fail with EIO
    on a hung-up one, and the checkpoint would not be saved); redirected to a file, they stay."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        null = os.fstat(devnull).st_rdev
        for fd in (1, 2):
            try:
                # a character device other than /dev/null: the terminal (isatty already says no once it hung up)
                st = os.fstat(fd)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev != null:
                    os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        os.close(devnull)


def in_a_deployment_run() -> bool:
    """Whether a Prefect runner or worker started this run. Its Cancel is a SIGTERM that Prefect's own handler must
    receive: the run acknowledges the cancel only while that handler is installed, and with training's the cancelled
    run ended Crashed ("aborted by an interrupt signal"), not Cancelled, its cancellation hooks not run.

    Answered without importing Prefect where it could only say no: a process that has not imported it (a torchrun rank,
    whose stage imports no Prefect) holds none of its run contexts, so `deployment.id` could come only from the flow run
    id or the mocked id in the environment, as Prefect reads them. Importing it cost each rank ~0.8 s of CPU at its start,
    on top of torch's and the stage's own (2026-12-07, this 2-core box)."""
    import sys

    if "prefect" not in sys.modules and not any(v in os.environ for v in ("PREFECT__FLOW_RUN_ID", "PREFECT__RUNTIME__DEPLOYMENT__ID")):
        return False
    try:
        from prefect.runtime import deployment
    except ImportError:  # the stage called as a plain function where Prefect is not installed (bench/pipeline_gpu.py on a GPU box)
        return False
    return deployment.id is not None
