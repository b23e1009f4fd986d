#!/usr/bin/env bash
# Issue 18's GPU showcase on one offline CUDA machine: the whole flow (Prefect included) with the `demo-gpu` profile —
# Gemma-3-270M *base* from its PyPI wheels, QLoRA on real conversations + constrained real instructions, stage 5 on
# the full IFEval (541) and AlpacaEval (805) sets — started in its own process session so it outlives one device
# call; `poll` waits for it and copies the results out.
#
#   bash bench/gpu_showcase.sh start UPLOAD_DIR [MINUTES] [--set k=v ...]   # install wheels, unpack the data stage, start
#   bash bench/gpu_showcase.sh poll OUT_DIR [SECONDS]                       # wait up to SECONDS, then report / copy results
#
# TAG=<name> runs one of several settings side by side on the same card (issue 18 item 5's recipe comparison): its own
# log, exit-code file, Prefect home and artifacts folder (ART defaults to /tmp/qlp-gpu-<name>). Side by side, the flows
# share the GPU, so compare them at a fixed step count (--set training.max_steps=N with a budget that does not bind),
# never by their clocks:
#
#   for t in a b c; do TAG=$t bash bench/gpu_showcase.sh start /tmp/up 60 --set training.max_steps=847 --set ...; done
#   for t in a b c; do TAG=$t bash bench/gpu_showcase.sh poll $OUT/$t 1; done     # after `wait_all` below says done
#   bash bench/gpu_showcase.sh wait_all SECONDS                                  # until every started TAG has an exit code
#   TAG=c bash bench/gpu_showcase.sh stop                                         # stop one setting (the others get its share)
#
# UPLOAD_DIR holds what bench/gpu_wheels.sh builds (the flow's wheels, Gemma's GGUF chunk wheels) and, optionally,
# data-*.tar.xz: a data stage built on a CPU machine (`artifacts/cache/data/<key>`, same config: the key matches),
# so the device needs neither the ShareGPT wheel nor the minute of tokenizing; and, optionally, eval-base*.tar.xz that
# an earlier `poll` brought back (the base's benchmark answers). No GGUF export on the device (the
# converter is a PyPI source archive; the CPU demo exports).
set -euo pipefail
shopt -s nullglob
cmd=$1; shift
if [[ -n ${TAG:-} ]]; then
  [[ $TAG =~ ^[A-Za-z0-9_-]+$ ]] || { echo "TAG=$TAG: letters, digits, - and _ only (it names files)" >&2; exit 2; }
  [[ -z ${ART:-} && -z ${PREFECT_HOME:-} ]] || { echo "TAG=$TAG with ART or PREFECT_HOME set: each tag needs its own (the default /tmp/qlp-gpu-$TAG); unset them" >&2; exit 2; }
fi
tag=${TAG:+-$TAG}
art=${ART:-/tmp/qlp-gpu${tag:--artifacts}}
log=/tmp/qlp-showcase$tag.log rc=/tmp/qlp-showcase$tag.rc t0=/tmp/qlp-showcase$tag.t0
export PREFECT_HOME=${PREFECT_HOME:-/tmp/qlp-prefect-home$tag} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [[ $cmd == wait_all ]]; then  # every TAG started on this machine (a .t0 file each) until each has its exit code
  started=(/tmp/qlp-showcase*.t0)
  (( ${#started[@]} )) || { echo "nothing started on this machine (no /tmp/qlp-showcase*.t0)"; exit 0; }
  for _ in $(seq "${1:-540}"); do
    left=0; for f in /tmp/qlp-showcase*.t0; do [[ -f ${f%.t0}.rc ]] || left=$((left + 1)); done
    (( left == 0 )) && break; sleep 1
  done
  for f in /tmp/qlp-showcase*.t0; do echo "${f%.t0}: $(( $(date +%s) - $(cat "$f") )) s, rc $(cat "${f%.t0}.rc" 2>/dev/null || echo running);" \
    "$(tr '\r' '\n' < "${f%.t0}.log" | grep -oE "[0-9:.]+ \| INFO .*(step [0-9]+/[0-9]+ |train: [0-9]+/|evaluate: |finetune: done).*" | tail -1 | cut -c1-200)"; done
  exit 0
fi
if [[ $cmd == stop ]]; then  # stop this TAG's flow (its process group); its exit code becomes "stopped" so wait_all moves on
  # Only the flow's own python process is matched (the bash wrapper quotes its arguments; a device call's shell that
  # names the folder does not start with python3), and never this script's own process group: `pkill -f <tag>`
  # killed the calling shell once, and with it the rc file that wait_all waits for.
  [[ -n ${TAG:-} ]] || { echo "stop needs TAG=<name>" >&2; exit 2; }
  own=$(ps -o pgid= $$ | tr -d ' ') killed=0
  for pid in $(pgrep -f "^([^ ]*/)?python3?(\.[0-9]+)? -m flows\.cli run .*--set artifacts_dir=$art( |$)" || true); do
    pg=$(ps -o pgid= "$pid" | tr -d ' ')
    [[ -n $pg && $pg != "$own" ]] || continue
    kill -- -"$pg" 2>/dev/null && killed=1
    for _ in $(seq 10); do pgrep -g "$pg" > /dev/null || break; sleep 1; done
    pgrep -g "$pg" > /dev/null && kill -9 -- -"$pg" 2>/dev/null
  done
  if (( killed )) || [[ ! -f $rc ]]; then echo stopped > "$rc"; fi
  echo "$art: rc $(cat "$rc")"
  exit 0
fi
if [[ $cmd == start ]]; then
  up=$1; minutes=${2:-10}; shift 2 || shift $#
  for half in "$up"/*.whl.part00; do  # a wheel sent in two halves (bench/gpu_wheels.sh): join it
    [[ -f $half && -f ${half%.part00}.part01 ]] && cat "$half" "${half%.part00}.part01" > "${half%.part00}" && rm "$half" "${half%.part00}.part01"
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$up"/*.whl
  mkdir -p "$art"
  # data-*.tar.xz: a data stage; eval-base*.tar.xz (what poll names eval-base.tar.xz; it matched only eval-base-* before
  # 2026-12-04, so k's and l's runs never unpacked the one given): the base's benchmark answers from an earlier showcase on this kind
  # of machine (what `poll` brings back); both are artifacts/cache/<stage>/<key> folders, used only when keys match
  for t in "$up"/data-*.tar.xz "$up"/eval-base*.tar.xz; do [[ -f $t ]] && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$t" "$art"; done
  # a data stage's record names the artifacts folder it was built in (another machine's): the stages read it through
  # tasks.common.read_record, which points its paths at this folder; rewriting record.json here (as before 2026-12-07)
  # now fails stage 1, whose COMPLETE marker lists each file's size and sha256 ("marked complete but its file record.json is ...")
  sets=(--set "artifacts_dir=$art" --set "export.gguf=[]")
  for s in "$@"; do sets+=("$s"); done
  rm -f "$rc"  # a second start on a warm machine (another setting, same ART: stages 1-2 cached)
  echo "$(date +%s)" > "$t0"
  PYTHONPATH=/tmp/site:$PWD setsid nohup bash -c "python3 -m flows.cli run --profile demo-gpu --minutes $minutes ${sets[*]@Q}; echo \$? > ${rc@Q}" \
    > "$log" 2>&1 < /dev/null &
  sleep 5; tail -5 "$log"
  exit 0
fi
out=$1; wait_s=${2:-540}
mkdir -p "$out"
for _ in $(seq "$wait_s"); do [[ -f $rc ]] && break; sleep 1; done
echo "elapsed $(( $(date +%s) - $(cat "$t0") )) s; rc $(cat "$rc" 2>/dev/null || echo running)"
grep -E "^[0-9:. |]*(INFO|WARNING|ERROR)" "$log" | grep -v "HTTP Request" | tail -40 | cut -c1-400
cp "$log" "$out/flow.log"
if [[ -f $rc && -f $art/latest.json ]]; then
  summary=$(python3 -c "import json; print(json.load(open('$art/latest.json'))['summary'])")
  cp "$summary" "$out/summary.json"
  pub=$(python3 -c "import json; print(json.load(open('$out/summary.json')).get('published') or '')")
  [[ -n $pub && -f $pub/eval.json ]] && cp "$pub/eval.json" "$out/eval.json" && xz -9f "$out/eval.json" && cp "$pub/README.md" "$out/model-card.md"
fi
# the trained adapter (30 MB for demo-gpu's r32), in 9 MB parts (a call's returned files are size-limited), so the tuned
# model can be read and re-scored on a CPU afterwards (recipe d's run did not bring it back, and the loops it showed
# could not be examined). Join and check in OUT/adapter:
#   cat adapter_model.safetensors.part* > adapter_model.safetensors && sha256sum -c SHA256
if [[ -f $rc && -f $out/summary.json ]]; then
  adapter=$(python3 -c "import json; print(json.load(open('$out/summary.json'))['stages'].get('train', {}).get('outputs', {}).get('adapter_dir') or '')")
  # an earlier poll's adapter into this OUT goes first: its extra parts (a bigger adapter) would join into this one's
  # file, and a run without an adapter would seem to have that one
  rm -rf "$out/adapter"
  if [[ -n $adapter && -f $adapter/adapter_model.safetensors ]]; then
    mkdir -p "$out/adapter" && rm -f "$out/adapter/adapter_model.safetensors.part"* && cp "$adapter/adapter_config.json" "$out/adapter/"
    split -b 9M -d "$adapter/adapter_model.safetensors" "$out/adapter/adapter_model.safetensors.part"
    # the bare file name, not this machine's path: `sha256sum -c SHA256` then checks the joined copy next to it
    (cd "$adapter" && sha256sum adapter_model.safetensors) > "$out/adapter/SHA256"
  fi
fi
# a stage 5 still running or cut: the passes it finished (cache/eval-parts, small JSON) and the base's answers, so a run
# the device budget ends in stage 5 still brings back what it generated (setting j, 2026-12-03, lost 6 of its 7 minutes)
if [[ ! -f $rc && -d $art/cache/eval-parts ]]; then tar -cJf "$out/eval-parts.tar.xz" -C "$art" cache/eval-parts $( [[ -d $art/cache/eval-base ]] && echo cache/eval-base); fi
# the base's benchmark answers (small JSON): carry them up next time and stage 5 generates only the tuned side
if [[ -f $rc && -d $art/cache/eval-base ]]; then tar -cJf "$out/eval-base.tar.xz" -C "$art" cache/eval-base; fi
ls -la "$out"
