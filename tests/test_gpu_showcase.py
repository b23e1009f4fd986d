"""bench/gpu_showcase.sh `poll` on a finished run's fake folders (no GPU, no flow): what it brings back of the adapter."""
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_showcase.sh"


@pytest.fixture
def finished_run():
    """A TAG's files as `start` and the flow leave them (exit code, log, start time, artifacts folder with latest.json
    and a run summary); `write(adapter_bytes)` sets the trained adapter (None: a run whose train stage failed)."""
    if not (shutil.which("bash") and shutil.which("sha256sum") and shutil.which("split") and shutil.which("python3")):
        pytest.skip("needs bash, python3, split and sha256sum")
    tag = f"pytest-{uuid.uuid4().hex[:12]}"
    art, files = Path(f"/tmp/qlp-gpu-{tag}"), [Path(f"/tmp/qlp-showcase-{tag}.{x}") for x in ("rc", "log", "t0")]
    for f, text in zip(files, ("0\n", "12:00:00.000 | INFO | done\n", "0\n")):
        f.write_text(text)
    summary = art / "runs" / "r1" / "summary.json"
    summary.parent.mkdir(parents=True)
    (art / "latest.json").write_text(json.dumps({"summary": str(summary)}))

    def write(adapter: bytes | None) -> None:
        folder = art / "runs" / "r1" / "adapter dir"
        train = {"status": "failed", "error": "RuntimeError: x"}
        if adapter is not None:
            folder.mkdir(exist_ok=True)
            (folder / "adapter_model.safetensors").write_bytes(adapter)
            (folder / "adapter_config.json").write_text("{}")
            train = {"status": "completed", "outputs": {"adapter_dir": str(folder)}}
        summary.write_text(json.dumps({"stages": {"train": train}, "published": None}))

    try:
        yield tag, write
    finally:
        shutil.rmtree(art, ignore_errors=True)
        for f in files:
            f.unlink(missing_ok=True)


def poll(tag: str, out: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ART", "PREFECT_HOME")} | {"TAG": tag}  # a TAG refuses both
    subprocess.run(["bash", str(SCRIPT), "poll", str(out), "1"], env=env, check=True, capture_output=True, cwd=SCRIPT.parents[1], timeout=120)


def joined(out: Path) -> bytes:
    """What the script's comment says to do in OUT/adapter: join the parts, then `sha256sum -c SHA256` must pass."""
    folder = out / "adapter"
    data = b"".join(p.read_bytes() for p in sorted(folder.glob("adapter_model.safetensors.part*")))
    (folder / "adapter_model.safetensors").write_bytes(data)
    subprocess.run(["sha256sum", "-c", "SHA256"], cwd=folder, check=True, capture_output=True)
    return data


def test_poll_brings_the_adapter_back_in_parts_that_join_and_check_on_another_machine(finished_run, tmp_path):
    """A second poll into the same OUT after a smaller adapter leaves no part of the first (the first's parts 01-02
    joined onto the second's part00); SHA256 names the file, not the device's path (`sha256sum -c` on the CPU machine
    looked for /tmp/qlp-gpu-.../adapter_model.safetensors); a run without an adapter keeps none from the earlier poll."""
    tag, write = finished_run
    out = tmp_path / "out dir"
    big, small = bytes(range(256)) * (19 * 4096), b"\x07" * (5 << 20)  # 19 MiB: 3 parts; 5 MiB: 1
    write(big)
    poll(tag, out)
    assert len(list((out / "adapter").glob("*.part*"))) == 3 and joined(out) == big
    write(small)
    poll(tag, out)
    assert joined(out) == small
    assert (out / "adapter" / "SHA256").read_text() == f"{hashlib.sha256(small).hexdigest()}  adapter_model.safetensors\n"
    write(None)
    poll(tag, out)
    assert not (out / "adapter").exists() and (out / "summary.json").is_file()
