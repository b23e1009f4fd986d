"""llama.cpp's `llama-quantize`, built once from the pinned llama-cpp-python source archive, for Q4_K_M GGUF.

Q4_K_M (the quant Ollama users pull by default) needs llama.cpp's C++ quantizer: no registry ships `llama-quantize`
for this machine, the prebuilt `xllamacpp` wheel does not expose it, and gguf-py's K-quants only dequantize. The
llama.cpp sources inside the same llama-cpp-python archive the GGUF converter comes from (tasks/export.py pins its
version and sha256) build it with CMake: only the `llama-quantize` target (ggml-base, libllama, llama-common), static,
Release. It is built only when `export.gguf` asks for q4_k_m (or `make quantizer`), once: the
binary is kept in the active environment (`<sys.prefix>/share/llama.cpp-quantize-<version>/`, or under
`$QLORA_PIPELINE_TOOLS` when set), next to the converter. The build prints a progress line every 10%: 2.5-5 minutes
on 2 cores (docs/BENCHMARKS.md "llama-quantize build"), well under one on 16.

    binary = ensure_quantizer(archive_spec, log)                       # builds once, then returns the cached binary
    quantize_gguf(binary, "model-f16.gguf", "model-q4_k_m.gguf", "Q4_K_M")
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .common import StageError, file_sha256, locked, usable_cores

BINARY = "llama-quantize"
# Only what the quantizer needs: no tests, examples, server, HTTPS; one static binary. Two cuts take a third off the
# build's CPU time (docs/BENCHMARKS.md "llama-quantize build") and leave the quantizer as fast, its output byte-identical:
# - GGML_CPU=OFF: llama-quantize computes nothing in a ggml graph; its arithmetic (ggml_quantize_chunk, the f16/bf16 ->
#   f32 rows) is ggml-base's portable C, which never used the CPU backend (-march=native, AMX, llamafile, repack).
# - C++ at -O1, C at Release's -O3: the C++ is libllama's model/graph code, chat templates, Jinja, argument parsing and
#   an HTTP client the quantizer never runs in a loop; the per-element loops are C (ggml-quants.c compiles to the same
#   object as before).
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_CPU=OFF", "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG")
GGUF_QUANT_TYPES = {"q4_k_m": "Q4_K_M"}  # export.gguf name -> llama-quantize's type


@dataclass(frozen=True)
class SourceArchive:
    """The pinned PyPI source archive whose `vendor/llama.cpp/` holds llama.cpp."""

    package: str
    version: str
    sha256: str


def tools_dir() -> Path:
    return Path(os.environ.get("QLORA_PIPELINE_TOOLS") or Path(sys.prefix) / "share")


def quantizer_path(src: SourceArchive) -> Path:
    return tools_dir() / f"llama.cpp-quantize-{src.version}" / BINARY


def ensure_quantizer(src: SourceArchive, log_fn=None) -> Path:
    """The `llama-quantize` binary, built from `src` the first time (download, sha256 check, CMake), then cached."""
    binary = quantizer_path(src)
    if binary.is_file():
        return binary
    log_fn = log_fn or (lambda m: None)
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise StageError(f"export.gguf q4_k_m builds llama.cpp's llama-quantize once and needs {' and '.join(missing)}; install them "
                         "(Debian: apt-get install cmake g++) or drop q4_k_m from export.gguf")
    with locked(binary.parent):
        if binary.is_file():
            return binary
        with tempfile.TemporaryDirectory(prefix="llama-quantize-") as tmp:
            archive = download_archive(src, Path(tmp), log_fn)
            root = extract_llama_cpp(archive, src, Path(tmp) / "src")
            built = build_quantizer(root, Path(tmp) / "build", log_fn)
            binary.parent.mkdir(parents=True, exist_ok=True)
            staged = binary.with_name(f".{BINARY}.tmp")
            shutil.copy2(built, staged)
            os.replace(staged, binary)  # complete or absent: a killed build leaves nothing to trust
    return binary


def download_archive(src: SourceArchive, dest: Path, log_fn) -> Path:
    log_fn(f"export: q4_k_m needs llama.cpp's llama-quantize; fetching its sources ({src.package}=={src.version} source archive, "
           "~77 MB) to build it once")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{src.package}=={src.version}", "-d", str(dest), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    archives = list(dest.glob("*.tar.gz"))
    if done.returncode or not archives:
        last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
        raise StageError(f"cannot download {src.package}=={src.version} to build llama-quantize ({last}); check your connection to "
                         "PyPI, or drop q4_k_m from export.gguf")
    got = file_sha256(archives[0])
    if got != src.sha256:
        raise StageError(f"{archives[0].name} has sha256 {got}, expected {src.sha256}; the download is corrupt or the archive changed")
    return archives[0]


def extract_llama_cpp(archive: Path, src: SourceArchive, dest: Path) -> Path:
    """`vendor/llama.cpp/` of the archive, without what the build never reads (models, docs, CI, the web UI)."""
    import tarfile

    prefix = f"{src.package.replace('-', '_')}-{src.version}/vendor/llama.cpp/"
    skip = ("models/", "docs/", ".github/", "media/", "tools/ui/", "examples/", "tests/", "gguf-py/", "conversion/")
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if not rel or ".." in rel.split("/") or rel.startswith(skip) or not (m.isfile() or m.isdir()):
                continue
            target = dest / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out)
            os.chmod(target, m.mode & 0o755)
    if not (dest / "tools" / "quantize" / "CMakeLists.txt").is_file():
        raise StageError(f"{archive.name} has no {prefix}tools/quantize; the pinned version and the archive disagree")
    return dest


def build_quantizer(root: Path, build: Path, log_fn) -> Path:
    """CMake configure + build of the llama-quantize target, a progress line every 10%; returns the binary."""
    jobs = usable_cores()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.monotonic()
    _run(["cmake", "-S", str(root), "-B", str(build), *generator, *CMAKE_OPTIONS], "configure", log_fn, t0)
    log_fn(f"export: building llama-quantize with {jobs} jobs (once; minutes on a few cores)")
    _run(["cmake", "--build", str(build), "--target", BINARY, "-j", str(jobs)], "build", log_fn, t0)
    binary = next((p for p in build.rglob(BINARY) if p.is_file() and os.access(p, os.X_OK)), None)
    if binary is None:
        raise StageError(f"the llama-quantize build finished without a {BINARY} binary under {build}; drop q4_k_m from export.gguf")
    log_fn(f"export: llama-quantize built in {time.monotonic() - t0:.0f}s")
    return binary


def _run(cmd: list[str], step: str, log_fn, t0: float) -> None:
    """Run a CMake step, streaming its output: a line per 10% of the build, the last lines kept for the error."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    said = 0
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        m = re.match(r"\s*\[\s*(\d+)%\]", line) or re.match(r"\s*\[(\d+)/(\d+)\]", line)
        if m:
            pct = int(m.group(1)) if m.lastindex == 1 else 100 * int(m.group(1)) // max(int(m.group(2)), 1)
            if pct >= said + 10:
                said = pct - pct % 10
                log_fn(f"export: building llama-quantize {said}% ({time.monotonic() - t0:.0f}s)")
    if proc.wait():
        reason = next((l for l in reversed(tail) if "error" in l.lower()), tail[-1] if tail else "no output")
        raise StageError(f"building llama-quantize failed at {step} ({reason.strip()[:300]}); drop q4_k_m from export.gguf to skip it")


def quantize_gguf(binary: Path, src: Path, dst: Path, qtype: str) -> None:
    """`llama-quantize src dst QTYPE` (from an f16/bf16/f32 GGUF); a failure is one line with its reason."""
    done = subprocess.run([str(binary), str(src), str(dst), qtype], capture_output=True, text=True)
    if done.returncode or not dst.is_file():
        lines = [l for l in (done.stderr + done.stdout).strip().splitlines() if l.strip()]
        reason = next((l for l in reversed(lines) if "error" in l.lower() or "failed" in l.lower()), lines[-1] if lines else "no output")
        raise StageError(f"llama-quantize cannot make {qtype} from {src.name} ({reason.strip()[:300]}); drop q4_k_m from export.gguf")
