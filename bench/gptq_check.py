"""Does the GPTQ W4A16 export behave like the merged model it came from? Run where llmcompressor's
compressed-tensors is importable (the GPU machine, or `.venv-gptq`):

    python bench/gptq_check.py PUBLISHED_DIR HELDOUT_JSONL OUT.json [--prompts 64] [--generate 8]

PUBLISHED_DIR is a published run folder (merged/ and gptq-w4a16/ inside); HELDOUT_JSONL the data stage's
heldout.jsonl (conversations the model never trained on). Measures, teacher-forced on the held-out answers:
top-1 agreement and mean KL(merged || W4A16) per answer token; then greedy answers to a few prompts side by
side, how many are identical, and decode tokens/s of each; and the two folders' sizes on disk.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def folder_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("published")
    p.add_argument("heldout")
    p.add_argument("out")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--generate", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pub = Path(args.published)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(pub / "merged")
    merged = AutoModelForCausalLM.from_pretrained(pub / "merged", dtype=dtype).to(device).eval()
    t0 = time.monotonic()
    w4 = AutoModelForCausalLM.from_pretrained(pub / "gptq-w4a16", dtype=dtype).to(device).eval()
    load_s = time.monotonic() - t0
    chats = [json.loads(line)["messages"] for line in Path(args.heldout).read_text().splitlines()[: args.prompts]]

    agree = total = 0
    kl_sum = 0.0
    with torch.inference_mode():
        for msgs in chats:
            prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
            full = prompt + msgs[-1]["content"]
            ids = tok(full, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
            start = len(tok(prompt, add_special_tokens=False).input_ids) - 1
            a = merged(ids).logits[0, start:-1].float().log_softmax(-1)
            b = w4(ids).logits[0, start:-1].float().log_softmax(-1)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            kl_sum += float((a.exp() * (a - b)).sum())

        side, speed = [], {"merged": [0, 0.0], "gptq-w4a16": [0, 0.0]}
        for msgs in chats[: args.generate]:
            enc = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
            row = {"prompt": msgs[-2]["content"][:200]}
            for name, model in (("merged", merged), ("gptq-w4a16", w4)):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.monotonic()
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
                if device == "cuda":
                    torch.cuda.synchronize()
                new = out[0, enc["input_ids"].shape[1]:]
                speed[name][0] += len(new)
                speed[name][1] += time.monotonic() - t
                row[name] = tok.decode(new, skip_special_tokens=True)
            side.append(row)

    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "heldout_chats": len(chats),
        "answer_tokens": total,
        "top1_agreement": round(agree / max(total, 1), 4),
        "mean_kl": round(kl_sum / max(total, 1), 5),
        "identical_greedy_answers": f"{sum(r['merged'] == r['gptq-w4a16'] for r in side)}/{len(side)}",
        "decode_tokens_per_s": {k: round(n / s, 1) for k, (n, s) in speed.items()},
        "load_seconds_w4a16": round(load_s, 2),
        "size_mib": {"merged": folder_mib(pub / "merged"), "gptq-w4a16": folder_mib(pub / "gptq-w4a16")},
        "quantization_config": json.loads((pub / "gptq-w4a16" / "config.json").read_text()).get("quantization_config", {}).get("config_groups"),
        "side_by_side": side,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "side_by_side"}, indent=1))


if __name__ == "__main__":
    main()
