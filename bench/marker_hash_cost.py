"""What a stage folder's COMPLETE file list costs (tasks/common.py `completion_marker`, `changed_file`): the build's
full sha256, and a cache hit's check with the digests remembered (in the process, on disk) and without them.

    nice -n 19 .venv/bin/python bench/marker_hash_cost.py [--gib 1] [--no-wait]

A folder of one `--gib` GiB file of random bytes stands in for a merged model's shard; the memos go to a temporary
XDG_CACHE_HOME, removed at the end. docs/RELIABILITY.md ("a complete stage folder's file") quotes its numbers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the stand-in weights file")
    ap.add_argument("--no-wait", action="store_true", help="hash a file just written at once, as before RACY_WAIT_BYTES")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="marker-hash-cost-"))
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
    from tasks import common

    try:
        weights = work / "weights.bin"
        with open(weights, "wb") as f:
            for _ in range(int(args.gib * 1024)):
                f.write(os.urandom(1 << 20))
        final = work / "cache" / "merge" / "k"
        with common.building(final, record_files=True) as tmp:
            (tmp / "merged").mkdir()
            os.link(weights, tmp / "merged" / "model.safetensors")
            (tmp / "record.json").write_text("{}")
            time.sleep(common.RACY_NS / 1e9 + 0.2)  # as a real build: its files older than RACY_NS when hashed, so remembered
            t = time.perf_counter()
        build = time.perf_counter() - t
        size = weights.stat().st_size
        print(f"build's marker (full sha256 of {size / 2**30:.2f} GiB): {build:.2f} s = {size / build / 1e9:.2f} GB/s")
        for label, prep in [("first hit after the build (digests remembered by it)", lambda: None),
                            ("a later run (memo on disk)", common._digests.clear),
                            ("no memo (another home, a copied folder)", lambda: (common._digests.clear(), shutil.rmtree(common.hash_memo_dir())))]:
            prep()
            t = time.perf_counter()
            assert common.changed_file(final) is None
            print(f"{label}: {1000 * (time.perf_counter() - t):.2f} ms")
        # A file written within RACY_NS before the marker hashes it (a merged model's single shard, a converted model's
        # weights: the marker follows their save at once) is not remembered if hashed at once (`_keep_digest`): its
        # first hit hashed it again. `--no-wait`: as before RACY_WAIT_BYTES (the build hashes at once).
        common.RACY_WAIT_BYTES = 1 << 62 if args.no_wait else 0  # else as a file of RACY_WAIT_BYTES (4 GiB) or more is
        fresh = work / "cache" / "merge" / "fresh"
        common._digests.clear()
        with common.building(fresh, record_files=True) as tmp:
            (tmp / "merged").mkdir()
            shutil.copyfile(weights, tmp / "merged" / "model.safetensors")  # written now, as a build writes it
            t = time.perf_counter()
        print(f"build's marker, the file written just before it: {time.perf_counter() - t:.2f} s")
        for label in ("first hit after a build that wrote the file just before its marker", "the hit after it (remembered then)"):
            t = time.perf_counter()
            assert common.changed_file(fresh) is None
            print(f"{label}: {1000 * (time.perf_counter() - t):.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
