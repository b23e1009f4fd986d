#!/usr/bin/env bash
# Issue 18's GPU showcase on one offline CUDA machine: the whole flow (Prefect included) with the `demo-gpu` profile —
# Gemma-3-270M *base* from its PyPI wheels, QLoRA on real conversations + constrained real instructions, stage 5 on
# the full IFEval (541) and AlpacaEval (805) sets — started in its own process session so it outlives one device
# call; `poll` waits for it and copies the results out.
#
#   bash bench/gpu_showcase.sh start UPLOAD_DIR [MINUTES] [--set k=v ...]   # install wheels, unpack the data stage, start
#   bash bench/gpu_showcase.sh poll OUT_DIR [SECONDS]                       # wait up to SECONDS, then report / copy results
#
# UPLOAD_DIR holds what bench/gpu_wheels.sh builds (the flow's wheels, Gemma's GGUF chunk wheels) and, optionally,
# data-*.tar.xz: a data stage built on a CPU machine (`artifacts/cache/data/<key>`, same config: the key matches),
# so the device needs neither the ShareGPT wheel nor the minute of tokenizing; and, optionally, eval-base-*.tar.xz that
# an earlier `poll` brought back (the base's benchmark answers). No GGUF export on the device (the
# converter is a PyPI source archive; the CPU demo exports).
set -euo pipefail
cmd=$1; shift
art=${ART:-/tmp/qlp-gpu-artifacts}
log=/tmp/qlp-showcase.log
export PREFECT_HOME=${PREFECT_HOME:-/tmp/qlp-prefect-home} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [[ $cmd == start ]]; then
  up=$1; minutes=${2:-10}; shift 2 || shift $#
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$up"/*.whl
  mkdir -p "$art"
  # data-*.tar.xz: a data stage; eval-base-*.tar.xz: the base's benchmark answers from an earlier showcase on this kind
  # of machine (what `poll` brings back); both are artifacts/cache/<stage>/<key> folders, used only when keys match
  for t in "$up"/data-*.tar.xz "$up"/eval-base-*.tar.xz; do [[ -f $t ]] && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$t" "$art"; done
  sets=(--set "artifacts_dir=$art" --set "export.gguf=[]")
  for s in "$@"; do sets+=("$s"); done
  rm -f /tmp/qlp-showcase.rc  # a second start on a warm machine (another setting, same ART: stages 1-2 cached)
  echo "$(date +%s)" > /tmp/qlp-showcase.t0
  PYTHONPATH=/tmp/site:$PWD setsid nohup bash -c "python3 -m flows.cli run --profile demo-gpu --minutes $minutes ${sets[*]@Q}; echo \$? > /tmp/qlp-showcase.rc" \
    > "$log" 2>&1 < /dev/null &
  sleep 5; tail -5 "$log"
  exit 0
fi
out=$1; wait_s=${2:-540}
mkdir -p "$out"
for _ in $(seq "$wait_s"); do [[ -f /tmp/qlp-showcase.rc ]] && break; sleep 1; done
echo "elapsed $(( $(date +%s) - $(cat /tmp/qlp-showcase.t0) )) s; rc $(cat /tmp/qlp-showcase.rc 2>/dev/null || echo running)"
grep -E "^[0-9:. |]*(INFO|WARNING|ERROR)" "$log" | grep -v "HTTP Request" | tail -40 | cut -c1-400
cp "$log" "$out/flow.log"
if [[ -f /tmp/qlp-showcase.rc && -f $art/latest.json ]]; then
  summary=$(python3 -c "import json; print(json.load(open('$art/latest.json'))['summary'])")
  cp "$summary" "$out/summary.json"
  pub=$(python3 -c "import json; print(json.load(open('$out/summary.json')).get('published') or '')")
  [[ -n $pub && -f $pub/eval.json ]] && cp "$pub/eval.json" "$out/eval.json" && cp "$pub/README.md" "$out/model-card.md"
fi
# the base's benchmark answers (small JSON): carry them up next time and stage 5 generates only the tuned side
if [[ -f /tmp/qlp-showcase.rc && -d $art/cache/eval-base ]]; then tar -cJf "$out/eval-base.tar.xz" -C "$art" cache/eval-base; fi
ls -la "$out"
