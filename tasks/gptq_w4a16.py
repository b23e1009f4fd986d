"""GPTQ W4A16 (compressed-tensors, for vLLM) of a merged model, with llmcompressor.

Runs in llmcompressor's own environment (`make gptq-env`: it pins transformers <= 5.17 and compressed-tensors
0.19, older than the pipeline's), so this file imports nothing from the pipeline. The export stage calls it
when `export.gptq` is true; by hand:

    .venv-gptq/bin/python tasks/gptq_w4a16.py MERGED_DIR OUT_DIR --calib DATA_DIR/train --samples 64

Calibration uses the run's own tokenized training conversations (the prompt format the model will serve).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Run as a script, this folder would be first on sys.path and its modules (data.py, profile.py, ...) would shadow
# the libraries llmcompressor imports; this script needs none of them.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="merged model folder (safetensors + tokenizer)")
    p.add_argument("out", help="output folder (compressed-tensors checkpoint)")
    p.add_argument("--calib", required=True, help="a tokenized split saved by the data stage (datasets.save_to_disk)")
    p.add_argument("--samples", type=int, default=64, help="calibration conversations")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="load a model or tokenizer of its own code (model.trust_remote_code); without it, one is refused")
    args = p.parse_args()

    import datasets
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    # trust_remote_code always given: left out, a model of its own code got transformers' "[y/N]" prompt on this
    # process's stdin (the terminal the run has, its output captured: a silent 15 s wait), then a ValueError
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                                                 trust_remote_code=args.trust_remote_code)
    calib = datasets.load_from_disk(args.calib)
    calib = calib.select(range(min(args.samples, len(calib)))).select_columns(["input_ids"])
    calib = calib.map(lambda e: {"attention_mask": [1] * len(e["input_ids"])})
    max_len = max(len(x) for x in calib["input_ids"])
    # W4A16: 4-bit symmetric int weights in groups (128 as in the W4A16 preset, else the largest of 64/32 that divides
    # every layer's input width: SmolLM2's 576 is not a multiple of 128), 16-bit activations; the LM head stays
    # 16-bit. vLLM's Marlin kernels take groups of 32, 64 and 128.
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), None)
    if group is None:
        raise SystemExit(f"no group size in 128/64/32 divides the layer widths {sorted(widths)}; GPTQ W4A16 is not possible for this model")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    oneshot(model=model, dataset=calib, recipe=recipe, max_seq_length=max_len, num_calibration_samples=len(calib))
    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    print(f"gptq: W4A16 written to {args.out} in {time.monotonic() - t0:.1f}s ({len(calib)} calibration conversations, group size {group})")


if __name__ == "__main__":
    main()
