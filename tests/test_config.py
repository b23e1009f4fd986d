"""The config parses, every profile validates, and bad input fails with one line per problem naming the key."""

from __future__ import annotations

import pytest
import yaml

from tasks.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, profile_names
from tasks.constraints import TYPES


def test_every_profile_in_pipeline_yaml_validates():
    names = profile_names()
    assert {"mistral-7b", "demo", "tiny"} <= set(names)
    for name in names:
        cfg = load_config(profile=name)
        assert cfg.profile == name


def test_mistral_profile_is_the_seed_recipe_exactly():
    cfg = load_config(profile="mistral-7b")
    assert cfg.model.name == "mistralai/Mistral-7B-v0.1"
    assert cfg.data.source == "trl-lib/Capybara"
    assert (cfg.quant.load_in_4bit, cfg.quant.quant_type, cfg.quant.double_quant) == (True, "nf4", True)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, "auto")  # auto = the seed's 0.05 on a dense model:
    from tasks.models import AUTO_DROPOUT  # tests/test_architectures.py resolves it on Llama (0.05) and on a MoE (none)

    assert AUTO_DROPOUT == 0.05
    assert cfg.lora.target_modules == "all-linear"  # = the seed's seven projections on Mistral (tests/test_train.py counts them)
    assert (cfg.training.micro_batch_size, cfg.training.grad_accum) == (4, 4)
    assert cfg.training.gradient_checkpointing and cfg.data.max_length == 2048
    assert cfg.output_name == "mistral-7b-instruct-qlora"


def test_default_profile_is_demo():
    assert load_config().profile == "demo"


def test_every_yaml_key_has_a_comment():
    # The YAML is the control panel: each key under defaults carries its trade-off (STYLE §2).
    lines = DEFAULT_CONFIG_PATH.read_text().splitlines()
    in_defaults = False
    for line in lines:
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if line.startswith("profiles:"):
            break
        if in_defaults and line.startswith("    ") and ":" in line and not line.strip().startswith("#"):
            key = line.split(":")[0].strip()
            assert "#" in line, f"pipeline.yaml key {key!r} has no comment"


def test_overrides_and_budget():
    cfg = load_config(profile="tiny", overrides=["lora.r=4", "training.learning_rate=1e-4", "data.source=x.jsonl"], hours=2)
    assert cfg.lora.r == 4 and cfg.training.learning_rate == 1e-4 and cfg.data.source == "x.jsonl"
    assert cfg.budget.seconds == 7200


def _problems(**kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(**kw)
    return e.value.problems


def test_unknown_profile_names_the_choices():
    (p,) = _problems(profile="mistral7b")
    assert "mistral7b" in p and "mistral-7b" in p


def test_every_problem_is_reported_at_once():
    probs = _problems(profile="tiny", overrides=["lora.r=0", "training.micro_batch_size=abc", "lora.rank=3"], hours=-1)
    text = "\n".join(probs)
    assert len(probs) >= 4
    assert "lora.r" in text and "training.micro_batch_size" in text and "lora.rank" in text and "budget.hours" in text


def test_vram_budget_is_gib_or_auto_one_line_each():
    assert load_config(profile="mistral-7b").budget.vram_gb == "auto"  # the card's free memory
    assert load_config(profile="tiny", overrides=["budget.vram_gb=12"]).budget.vram_gb == 12.0
    for bad in ("lots", "-3", "0"):
        (p,) = _problems(profile="tiny", overrides=[f"budget.vram_gb={bad}"])
        assert p.startswith("budget.vram_gb: must be GiB > 0 or auto") and bad in p


WEIGHTED = ["data.embedded_bases=[pypi:alpaca-en-demo]"]  # tiny's embedded_bases is []: weights there act on nothing


def test_embedded_type_weights_parse_and_bad_ones_are_one_line_each():
    w = load_config(profile="tiny", overrides=[*WEIGHTED, "data.embedded_type_weights={end_phrase: 3, word_count: 0}"]).data.embedded_type_weights
    assert w == {"end_phrase": 3.0, "word_count": 0.0}
    assert load_config(profile="tiny", overrides=["data.embedded_type_weights={}"]).data.embedded_type_weights is None
    assert load_config(profile="tiny", overrides=[*WEIGHTED, "data.embedded_type_weights={end_phrase: 0}"])  # the others still weigh 1
    all_zero = "{" + ", ".join(f"{t}: 0" for t in TYPES) + "}"
    for bad, says in (("{endphrase: 3, foo: 1}", ["unknown constraint type 'endphrase', 'foo'", "use names from", "end_phrase"]),
                      ("{end_phrase: -1, word_count: .inf, title: .nan}", ["end_phrase: -1, word_count: inf, title: nan", ">= 0"]),
                      (all_zero, ["every constraint type weighs 0", "give at least one a weight > 0"]),
                      ("{end_phrase: lots}", ["end_phrase", "lots"]),
                      ("{end_phrase: true, title: 2}", ["weights must be finite numbers >= 0 (got end_phrase: True)", "0 = never primary"]),
                      ("3", ["must be a mapping of constraint type to weight", "{end_phrase: 3"])):
        (p,) = _problems(profile="tiny", overrides=[*WEIGHTED, f"data.embedded_type_weights={bad}"])
        assert p.startswith("data.embedded_type_weights") and "\n" not in p and all(s in p for s in says), p


@pytest.mark.parametrize("where, why", [
    (["data.source=pypi:alpaca-en-demo"], "data.source is 'pypi:alpaca-en-demo', not embedded"),
    (["data.embedded_bases=[]"], "data.embedded_bases is []"),
    (["data.embedded_task_share=1"], "data.embedded_task_share is 1"),
])
def test_type_weights_that_weight_no_row_are_one_line_naming_the_key(where, why):
    """Weights where no row takes a constraint from the embedded bases would only change the data cache key: an error
    naming the key, why it does nothing, and the fix. The embedded source is data.source only (data.mix refuses it)."""
    (p,) = _problems(profile="tiny", overrides=[*WEIGHTED, *where, "data.embedded_type_weights={end_phrase: 3}"])
    assert p.startswith("data.embedded_type_weights: set, but ") and why in p and p.endswith("remove it") and "\n" not in p, p
    for unset in ("{}", "null"):  # unset is fine anywhere
        assert load_config(profile="tiny", overrides=[*WEIGHTED, *where, f"data.embedded_type_weights={unset}"])


def test_embedded_keywords_added_parses_and_bad_or_idle_values_are_one_line_naming_the_key():
    """data.embedded_keywords_added: a share in [0, 1]; anything else, or a share where no row takes a constraint from
    the embedded bases (it would add words to nothing and only change the data key), is one line naming the key."""
    assert load_config(profile="tiny", overrides=[*WEIGHTED, "data.embedded_keywords_added=0.7"]).data.embedded_keywords_added == 0.7
    assert load_config(profile="tiny").data.embedded_keywords_added == 0.0
    for bad in ("-0.1", "2", "x"):
        (p,) = _problems(profile="tiny", overrides=[*WEIGHTED, f"data.embedded_keywords_added={bad}"])
        assert p.startswith("data.embedded_keywords_added") and "\n" not in p, p
    for where, why in ((["data.source=pypi:alpaca-en-demo"], "not embedded"), ([], "data.embedded_bases is []")):
        (p,) = _problems(profile="tiny", overrides=[*where, "data.embedded_keywords_added=0.5"])
        assert p.startswith("data.embedded_keywords_added: set, but ") and why in p and p.endswith("remove it"), p
        assert load_config(profile="tiny", overrides=[*where, "data.embedded_keywords_added=0"])  # 0 is fine anywhere


def test_embedded_base_min_words_parses_and_bad_or_idle_values_are_one_line_naming_the_key():
    """data.embedded_base_min_words: unset by default; a word count of 5-2,000 that is not above
    data.embedded_base_max_words (no answer would fit); set where no row takes a base (another source, no bases, task
    families only), it would pick nothing and only change the data key: one line each, naming the key and the fix."""
    assert load_config(profile="tiny").data.embedded_base_min_words is None
    assert load_config(profile="tiny", overrides=[*WEIGHTED, "data.embedded_base_min_words=60"]).data.embedded_base_min_words == 60
    for bad in ("4", "2001", "x", "1.5"):
        (p,) = _problems(profile="tiny", overrides=[*WEIGHTED, f"data.embedded_base_min_words={bad}"])
        assert p.startswith("data.embedded_base_min_words") and "\n" not in p, p
    (p,) = _problems(profile="tiny", overrides=[*WEIGHTED, "data.embedded_base_max_words=100", "data.embedded_base_min_words=150"])
    assert p.startswith("data: embedded_base_min_words 150 is above embedded_base_max_words 100") and "\n" not in p, p
    assert "lower it or raise embedded_base_max_words (e.g. 600)" in p
    for where, why in ((["data.source=pypi:alpaca-en-demo"], "not embedded"), ([], "data.embedded_bases is []"),
                       ([*WEIGHTED, "data.embedded_task_share=1"], "task-family rows only")):
        (p,) = _problems(profile="tiny", overrides=[*where, "data.embedded_base_min_words=60"])
        assert p.startswith("data.embedded_base_min_words: set, but ") and why in p and p.endswith("remove it"), p


def test_embedded_base_min_words_5_is_unset_and_an_idle_value_above_the_max_says_remove_it():
    """5 is every base there is (constraints.base_of takes answers of 5 words or more): the rows of unset, so the data key
    of unset. Set where no row takes a base, a value above data.embedded_base_max_words is still idle: "remove it", not
    advice to raise the max, which only leads to the idle error next."""
    from tasks.data import cache_key

    five, unset = (load_config(profile="tiny", overrides=[*WEIGHTED, *ov]) for ov in (["data.embedded_base_min_words=5"], []))
    assert five.data.embedded_base_min_words is None and cache_key(five.data, five.model, five.artifacts_dir) == cache_key(unset.data, unset.model, unset.artifacts_dir)
    for where in ([], ["data.source=pypi:alpaca-en-demo"], [*WEIGHTED, "data.embedded_task_share=1"]):
        (p,) = _problems(profile="tiny", overrides=[*where, "data.embedded_base_min_words=150"])
        assert p.startswith("data.embedded_base_min_words: set, but ") and p.endswith("remove it"), p


def test_set_into_a_mapping_sets_one_entry_and_keeps_the_others():
    """`--set eval.benchmark_prompts.ifeval=120` sets that entry: the profile's other entries stay (the error's old
    advice, `--set 'eval.benchmark_prompts={ifeval: 120}'`, silently dropped tiny's alpaca_eval: 6, so AlpacaEval ran
    all 805 prompts). A whole mapping still replaces; a wrong entry is still named."""
    base = load_config(profile="tiny")
    cfg = load_config(profile="tiny", overrides=["eval.benchmark_prompts.ifeval=120"])
    assert cfg.eval.benchmark_prompts == {**base.eval.benchmark_prompts, "ifeval": 120} and "alpaca_eval" in base.eval.benchmark_prompts
    assert load_config(profile="tiny", overrides=["eval.benchmark_prompts={ifeval: 120}"]).eval.benchmark_prompts == {"ifeval": 120}
    cfg = load_config(profile="tiny", overrides=["model.random_config.num_hidden_layers=1"])
    assert cfg.model.random_config == {**base.model.random_config, "num_hidden_layers": 1}
    assert base.data.embedded_type_weights is None  # unset: the first entry starts the mapping
    cfg = load_config(profile="tiny", overrides=[*WEIGHTED, "data.embedded_type_weights.end_phrase=3"])
    assert cfg.data.embedded_type_weights == {"end_phrase": 3.0}
    problems = _problems(profile="tiny", overrides=["eval.benchmark_prompts.ifevl=5"])
    assert any(p.startswith("eval.benchmark_prompts") and "ifevl" in p for p in problems), problems
    assert "lora.rr" in _problems(profile="tiny", overrides=["lora.rr=3"])[0]  # not a mapping: still an unknown key


def test_a_misspelt_key_names_the_closest_one():
    assert _problems(profile="tiny", overrides=["eval.max_new_token=5"]) == [
        "--set eval.max_new_token: unknown key; did you mean eval.max_new_tokens?"]
    assert "did you mean training.learning_rate?" in _problems(profile="tiny", overrides=["trainig.learning_rate=1e-4"])[0]
    assert "see pipeline.yaml" in _problems(profile="tiny", overrides=["nothing.like.this=1"])[0]
    assert "did you mean training.seed?" in _problems(profile="tiny", overrides=["trainig.seed=1"])[0]  # not data.seed
    assert "did you mean model.revision?" in _problems(profile="tiny", overrides=["modle.revision=x"])[0]
    assert "did you mean eval.benchmark_prompts?" in _problems(profile="tiny", overrides=["eval.benchmark_prompt.ifeval=3"])[0]


def test_a_misspelt_key_in_a_whole_mapping_or_a_file_names_the_closest_one(tmp_path):
    """`--set lora.rnak=8` said "did you mean lora.r?", but the same typo in `--set 'lora={rnak: 8}'`, a --config file or a
    data.mix entry pointed at `run --help`, which lists no keys (a review, 2026-12-06): every path names the nearest key."""
    assert _problems(profile="tiny", overrides=['lora={"rnak": 8}']) == ["lora.rnak: unknown key; did you mean lora.r?"]
    problems = _problems(profile="tiny", overrides=['data.mix=[{"sourc": "x.jsonl", "share": 0.2}]'])
    assert "data.mix[0].sourc: unknown key; did you mean data.mix[0].source?" in problems, problems
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["profiles"]["tiny"]["training"]["learnig_rate"] = 0.1
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    assert _problems(path=path, profile="tiny") == ["training.learnig_rate: unknown key; did you mean training.learning_rate?"]
    assert not any("--help" in p for p in _problems(profile="tiny", overrides=['lora={"zzz": 1}']))


def test_an_unknown_key_is_told_a_key_that_can_be_set(tmp_path):
    """`data: {heldout: 100}` in a file was told "did you mean data.mix.heldout?", a key of the mix entries that no
    --set takes (a review, 2026-12-06): outside an entry the hint is the dotted --set path's (data.heldout_size); inside
    one, the nearest of that entry's own keys by name, not by the whole path (count -> heldout, file -> filter were)."""
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["profiles"]["tiny"]["data"]["heldout"] = 100
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    dotted = _problems(profile="tiny", overrides=["data.heldout=100"])[0]
    assert _problems(path=path, profile="tiny") == [dotted.removeprefix("--set ")] == ["data.heldout: unknown key; did you mean data.heldout_size?"]
    for leaf in ("rows", "share", "filter"):
        assert "data.mix" not in _problems(profile="tiny", overrides=[f'data={{"{leaf}": 1}}'])[0]
    problems = _problems(profile="tiny", overrides=['data.mix=[{"source": "x.jsonl", "share": 0.2, "path": 1, "file": 1, "name": 1, "count": 1, "r": 1, "row": 1}]'])
    assert "data.mix[0].path: unknown key; did you mean data.mix[0].source?" in problems, problems
    assert "data.mix[0].file: unknown key; did you mean data.mix[0].source?" in problems, problems
    assert "data.mix[0].name: unknown key; did you mean data.mix[0].source?" in problems, problems
    assert "data.mix[0].row: unknown key; did you mean data.mix[0].rows?" in problems, problems
    for leaf in ("count", "r"):
        assert f"data.mix[0].{leaf}: unknown key; its keys: filter, heldout, revision, rows, schema, share, source, split" in problems, problems


def test_bad_dotted_key_and_absurd_budget():
    assert "dotted" in _problems(profile="tiny", overrides=["lora..r=3"])[0]
    assert "no_equals" in _problems(profile="tiny", overrides=["no_equals"])[0]
    assert "720" in _problems(profile="tiny", hours=1000)[0]
    assert "budget.minutes" in _problems(profile="tiny", minutes=0)[0]


def test_unknown_key_in_file_is_named(tmp_path):
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["profiles"]["tiny"]["training"]["learning_rat"] = 0.1
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    (p,) = _problems(path=path, profile="tiny")
    assert "training.learning_rat" in p and "unknown key" in p


def test_cuda_requested_without_gpu_fails_early():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert any("device" in p and "cuda" in p for p in _problems(profile="tiny", overrides=["device=cuda"]))


@pytest.fixture
def liger_on_gpu(monkeypatch):
    """A CUDA machine, as the config check sees it, with the given liger-kernel and transformers installed."""
    import torch

    from tasks import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def install(liger: str | None, transformers: str = "5.24.0", refused: str | None = None) -> None:
        monkeypatch.setattr(config, "installed_version", {"liger-kernel": liger, "transformers": transformers}.get)
        monkeypatch.setattr(config, "liger_import_error", lambda: refused)

    return install


def test_liger_older_than_transformers_needs_is_one_line_before_any_work(liger_on_gpu, tmp_path, capsys):
    from flows.cli import main

    liger_on_gpu("0.6.5")
    (p,) = _problems(profile="tiny")
    assert p == ("training.liger: liger-kernel 0.6.5 is installed, and Liger's kernels on transformers 5.24.0 need liger-kernel>=0.7.0; "
                 "upgrade it (pip install -U 'liger-kernel>=0.7.0') or set training.liger=false")
    art = tmp_path / "artifacts"
    assert main(["run", "--profile", "tiny", "--minutes", "1", "--set", f"artifacts_dir={art}"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"config error: {p}"]
    assert not art.exists()  # refused before any work


def test_a_liger_that_refuses_this_transformers_is_one_line(liger_on_gpu):
    """liger-kernel 0.8.5 raises ImportError on transformers 4 (its floor is 5.0) though it is newer than 0.5: the
    refusal itself is asked for, and said in one line before any work."""
    liger_on_gpu("0.8.5", "4.57.6", refused="liger-kernel requires transformers >= 5.0.0, got 4.57.6. Please install an older version")
    (p,) = _problems(profile="tiny")
    assert p.startswith("training.liger: liger-kernel 0.8.5 does not load with transformers 4.57.6 (liger-kernel requires transformers >= 5.0.0")
    assert p.endswith("install a liger-kernel that supports it, upgrade transformers, or set training.liger=false")
    load_config(profile="tiny", overrides=["training.liger=false"])  # the fix it names


@pytest.mark.parametrize("liger, transformers, overrides", [
    ("0.7.0", "5.24.0", []),                           # new enough
    ("0.6.5", "4.57.6", []),                           # transformers 4: 0.5 and later patch it
    (None, "5.24.0", []),                              # not installed: the engines run without Liger
    ("0.6.5", "5.24.0", ["training.liger=false"]),     # the fix the message names
    ("0.6.5", "5.24.0", ["training.engine=padded"]),   # an engine that never applies Liger
    ("0.6.5", "5.24.0", ["device=cpu"]),               # nor does the CPU
])
def test_liger_is_checked_only_where_it_would_be_applied(liger_on_gpu, liger, transformers, overrides):
    liger_on_gpu(liger, transformers)
    load_config(profile="tiny", overrides=overrides)  # no ConfigError


def test_offload_activations_is_off_on_or_auto_one_line_each():
    assert load_config(profile="mistral-7b").training.offload_activations == "auto"  # the probe decides, on a memory budget
    ckpt = "training.gradient_checkpointing=true"  # the tiny profile trains without checkpointing
    for given, read in (("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on"), ("false", "off")):  # YAML reads on/off as booleans
        assert load_config(profile="tiny", overrides=[ckpt, f"training.offload_activations={given}"]).training.offload_activations == read
    (p,) = _problems(profile="tiny", overrides=[ckpt, "training.offload_activations=maybe"])
    assert p == "training.offload_activations: Input should be 'off', 'on' or 'auto' (got 'maybe')"
    (p,) = _problems(profile="tiny", overrides=["training.offload_activations=on"])
    assert p.startswith("training.offload_activations: on offloads the checkpointed layers' inputs, and training.gradient_checkpointing is false")
    load_config(profile="tiny", overrides=["training.offload_activations=auto"])  # auto without checkpointing: nothing to offload, no error


def test_a_misspelt_random_config_key_is_one_line_naming_the_architecture_and_the_real_key(tmp_path, capsys):
    """transformers keeps a key its config does not know as an attribute nothing reads: `hiden_size=32` trained a
    model of tiny's hidden_size 64 without a word. Now it is a config error before any work, for sub-configs too."""
    from flows.cli import main

    assert _problems(profile="tiny", overrides=["model.random_config.hiden_size=32"]) == [
        "model.random_config.hiden_size: not a key of mistral's config (MistralConfig), which would keep it unread (the model builds "
        "as if it were absent); did you mean hidden_size?"]
    gemma3 = ["model.name=random:gemma3", "model.random_config={text_config: {hidden_size: 64, num_hidden_layers: 2, head_dim: 16}, "
              "vision_config: {hidden_size: 32, num_hidden_layers: 1, patch_size: 14}}"]
    assert load_config(profile="tiny", overrides=gemma3).model.random_config["text_config"]["head_dim"] == 16
    (p,) = _problems(profile="tiny", overrides=[*gemma3, "model.random_config.text_config.num_hiden_layers=1"])
    assert p.startswith("model.random_config.text_config.num_hiden_layers: not a key of gemma3's text_config (Gemma3TextConfig)")
    assert p.endswith("did you mean num_hidden_layers?")
    (p,) = _problems(profile="tiny", overrides=[*gemma3, "model.random_config.vision_config.patch_sise=16"])
    assert "gemma3's vision_config (SiglipVisionConfig)" in p and p.endswith("did you mean patch_size?")
    assert _problems(profile="tiny", overrides=["model.name=random:mistrl"]) == [
        "model.name random:mistrl: not a transformers model type; did you mean random:mistral?"]
    art = tmp_path / "artifacts"
    assert main(["run", "--profile", "tiny", "--minutes", "1", "--set", f"artifacts_dir={art}", "--set", "model.random_config.hiden_size=32"]) == 2
    assert capsys.readouterr().err.startswith("config error: model.random_config.hiden_size: not a key of mistral's config")
    assert not art.exists()  # refused before any work


def test_legitimate_random_config_keys_keep_working(monkeypatch):
    """Keys the architecture reads without an __init__ parameter of that name pass: consumed by the config (rope_theta,
    attn_implementation), settable properties (num_labels), aliases (gpt2's hidden_size = n_embd), attributes the
    modeling code reads (qwen3_moe's head_dim, phi3's partial_rotary_factor), and every real shape bench/gpu_archs.py builds."""
    from pathlib import Path

    from tasks.random_config import random_config_problems

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    from bench.gpu_archs import SHAPES, shapes

    for profile in SHAPES:
        for smoke in (False, True):
            arch, config = shapes(profile, smoke)
            assert random_config_problems(arch, config) == [], (profile, smoke)
    from tests.test_architectures import ARCHS

    for arch, (config, _, _) in ARCHS.items():
        assert random_config_problems(arch, config) == [], arch
    assert random_config_problems("llama", {"rope_theta": 1e6, "attn_implementation": "eager", "num_labels": 2, "dtype": "bfloat16",
                                            "rope_scaling": {"rope_type": "linear", "factor": 2.0}}) == []
    assert random_config_problems("gpt2", {"hidden_size": 64, "n_layer": 2}) == []


def test_a_random_model_with_a_misspelt_key_is_not_built(tmp_path):
    """A ModelSection made in code skips load_config: the builder refuses the key too, before building anything."""
    from tasks.common import StageError
    from tasks.config import ModelSection
    from tasks.models import resolve_model

    with pytest.raises(StageError, match="model.random_config.hiden_size: .*did you mean hidden_size"):
        resolve_model(ModelSection(name="random:mistral", random_config={"hidden_size": 64, "hiden_size": 32}), str(tmp_path))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_null_on_a_mapping_entry_removes_it():
    """`--set mapping.entry=null` removes that entry (its default applies again): before, the null went into the mapping,
    an error for a weight and a None initializer_range for the random model. In model.random_config a key whose config
    takes None keeps null (mistral's sliding_window: no window). Removing an entry that is not there is named."""
    base = load_config(profile="tiny")
    set_two = [*WEIGHTED, "data.embedded_type_weights={end_phrase: 3, word_count: 2}"]
    cfg = load_config(profile="tiny", overrides=[*set_two, "data.embedded_type_weights.end_phrase=null"])
    assert cfg.data.embedded_type_weights == {"word_count": 2.0}
    cfg = load_config(profile="tiny", overrides=[*WEIGHTED, "data.embedded_type_weights.end_phrase=3", "data.embedded_type_weights.end_phrase=null"])
    assert cfg.data.embedded_type_weights is None  # the last entry gone: unset, the same data key as never set
    assert load_config(profile="tiny", overrides=["eval.benchmark_prompts.ifeval=null"]).eval.benchmark_prompts == {
        k: v for k, v in base.eval.benchmark_prompts.items() if k != "ifeval"}
    config = load_config(profile="tiny", overrides=["model.random_config.initializer_range=null"]).model.random_config
    assert config == {k: v for k, v in base.model.random_config.items() if k != "initializer_range"}
    assert load_config(profile="tiny", overrides=["model.random_config.sliding_window=null"]).model.random_config["sliding_window"] is None
    again = ["model.random_config.initializer_range=null", "model.random_config.initializer_range=0.1"]  # in order: the last wins
    assert load_config(profile="tiny", overrides=again).model.random_config["initializer_range"] == 0.1
    assert _problems(profile="tiny", overrides=[*set_two, "data.embedded_type_weights.end_phrse=null"]) == [
        "--set data.embedded_type_weights.end_phrse=null: nothing to remove, data.embedded_type_weights has no entry 'end_phrse'; "
        "did you mean end_phrase?"]
    (p,) = _problems(profile="tiny", overrides=["model.random_config.hiden_size=null"])
    assert p.startswith("--set model.random_config.hiden_size=null: nothing to remove") and p.endswith("did you mean hidden_size?")


GEMMA3 = ["model.name=random:gemma3", "model.random_config={text_config: {hidden_size: 64, num_hidden_layers: 2, head_dim: 16}}"]


def test_random_config_keys_in_the_wrong_place_are_refused(tmp_path, capsys):
    """Keys the modeling code reads off another config than the one they were given to: gemma3's flat hidden_size
    (its text model reads text_config's, so this built a 2.7B default), a text_config on mistral/llama (no sub-configs:
    the build crashed on `'dict' object has no attribute 'vocab_size'`), and model_type (model.name sets it: the build
    failed on "multiple values for argument 'model_type'")."""
    from flows.cli import main

    flat = ["model.name=random:gemma3", "model.random_config={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
            "num_key_value_heads: 2, intermediate_size: 128}"]
    problems = _problems(profile="tiny", overrides=flat)
    assert [p.split(":")[0] for p in problems] == [f"model.random_config.{k}" for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")]
    assert problems[0].startswith("model.random_config.hidden_size: not a key of gemma3's config (Gemma3Config)")
    assert problems[0].endswith("; set it inside text_config: model.random_config.text_config.hidden_size")
    load_config(profile="tiny", overrides=[*GEMMA3, "model.random_config.vocab_size=600"])  # the builder gives it to text_config
    for arch in ("mistral", "llama"):
        assert _problems(profile="tiny", overrides=[f"model.name=random:{arch}", "model.random_config.text_config.hidden_sz=8"]) == [
            f"model.random_config.text_config: not a key of {arch}'s config ({arch.capitalize()}Config), which would keep it unread (the "
            f"model builds as if it were absent); {arch.capitalize()}Config has no sub-configs: set these keys in model.random_config itself"]
    assert _problems(profile="tiny", overrides=["model.random_config.model_type=llama"]) == [
        "model.random_config.model_type: model.name random:mistral sets it; remove it, or set model.name=random:llama"]
    art = tmp_path / "artifacts"
    assert main(["run", "--profile", "tiny", "--minutes", "1", "--set", f"artifacts_dir={art}", "--set", "model.random_config.text_config.hidden_sz=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: model.random_config.text_config: not a key of mistral's config") and len(err.strip().splitlines()) == 1
    assert not art.exists()


def test_random_config_keys_only_named_by_shared_code_are_refused_and_real_ones_kept():
    """transformers' shared code names keys it reads off other objects: `hasattr(self, "num_heads")` (a check of some
    other configs), rope_parameters' dict keys rope_type and factor. Those were taken as read; only a read off the config
    (`config.<key>`, `getattr(config, "<key>"`, `kwargs.get("<key>"`) counts now. GenerationConfig's fields are read off
    the model's config (from_model_config), so cache_implementation is a key."""
    from tasks.random_config import random_config_problems

    for arch, key, value, hint in [("llama", "num_heads", 4, "did you mean num_key_value_heads or num_attention_heads?"),
                                   ("mistral", "rope_type", "linear", None), ("mistral", "factor", 2.0, None),
                                   ("llama", "num_layers", 2, "did you mean num_hidden_layers?")]:
        (p,) = random_config_problems(arch, {key: value})
        assert p.startswith(f"model.random_config.{key}: not a key of {arch}'s config"), p
        assert hint is None or p.endswith(hint), p
    assert random_config_problems("llama", {"cache_implementation": "static"}) == []
    assert random_config_problems("qwen3_moe", {"head_dim": 16}) == random_config_problems("phi3", {"partial_rotary_factor": 0.75}) == []


def test_null_then_entries_of_a_random_config_mapping_start_it_again():
    """The last override wins: a removal (`=null`) still pending is no obstacle to a later entry under it (it was
    "'rope_scaling' is not a section"), the same removal twice removes once, and a removed dtype builds in float32."""
    rope = ["model.random_config.rope_scaling={rope_type: linear, factor: 2.0}", "model.random_config.rope_scaling=null"]
    cfg = load_config(profile="tiny", overrides=[*rope, "model.random_config.rope_scaling.factor=3.0"])
    assert cfg.model.random_config["rope_scaling"] == {"factor": 3.0}
    cfg = load_config(profile="tiny", overrides=[*GEMMA3, "model.random_config.text_config=null", "model.random_config.text_config.hidden_size=32"])
    assert cfg.model.random_config["text_config"] == {"hidden_size": 32}
    twice = ["model.random_config.initializer_range=null"] * 2
    assert "initializer_range" not in load_config(profile="tiny", overrides=twice).model.random_config
    twice = ["data.embedded_type_weights.end_phrase=null"] * 2
    assert load_config(profile="tiny", overrides=[*WEIGHTED, "data.embedded_type_weights={end_phrase: 3, word_count: 2}", *twice]
                       ).data.embedded_type_weights == {"word_count": 2.0}


def test_a_null_random_dtype_builds_in_float32(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.models import resolve_model

    model = load_config(profile="tiny", overrides=["model.random_config.dtype=bfloat16", "model.random_config.dtype=null"]).model
    assert model.random_config["dtype"] is None  # PretrainedConfig takes dtype None: the null is kept
    ref = resolve_model(model, str(tmp_path))
    assert next(AutoModelForCausalLM.from_pretrained(ref.path).parameters()).dtype == torch.float32


def test_a_problem_elsewhere_is_reported_without_importing_transformers():
    """The random_config check imports transformers and torch (~2 s): it runs last, only when all else is right."""
    import subprocess
    import sys

    code = ("import sys\nfrom tasks.config import load_config, ConfigError\ntry:\n    load_config(profile='tiny', overrides=['lora.alpha=0'])\n"
            "except ConfigError as e:\n    print(e.problems)\nprint('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("['lora.alpha: must be > 0") and out[1] == "False"


@pytest.mark.parametrize("value, says", [
    ("q_proj", "lora.target_modules: a list of layer names such as [q_proj], or all-linear"),
    ("q_proj|v_proj", "lora.target_modules: a list of layer names such as [q_proj, v_proj], or all-linear"),
    (".*_proj", "lora.target_modules: a list of layer names such as [q_proj, v_proj], or all-linear"),
    ("all_linear", "lora.target_modules: did you mean all-linear?"),
])
def test_a_single_string_of_target_modules_is_one_line_naming_the_fix(value, says):
    """PEFT takes one string as a regex; here a string other than all-linear was pydantic's two lines for the union
    ("Input should be a valid list", "Input should be 'all-linear'") with no word on what to write (a review, 2026-12-04)."""
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(profile="tiny", overrides=[f"lora.target_modules={value}"])
    assert str(e.value).startswith(says) and "\n" not in str(e.value), str(e.value)


def test_peft_keyword_names_say_where_they_live_here(tmp_path):
    """LoraConfig's target_parameters, lora_alpha and lora_dropout, written by someone coming from PEFT, were "unknown key;
    see pipeline.yaml for the keys" (a review, 2026-12-04): the line says which key takes them."""
    (p,) = _problems(profile="tiny", overrides=["lora.target_parameters=[experts.gate_up_proj]"])
    assert p.startswith("--set lora.target_parameters: unknown key; name expert weights in lora.target_modules too"), p
    (p,) = _problems(profile="tiny", overrides=["lora.lora_alpha=16"])
    assert p.endswith("did you mean lora.alpha?"), p
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["profiles"]["tiny"]["lora"]["lora_dropout"] = 0.1
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    (p,) = _problems(path=path, profile="tiny")
    assert "lora.lora_dropout: unknown key; did you mean lora.dropout?" in p, p


def test_set_takes_a_text_key_s_value_as_typed():
    # Read as YAML, `--set data.system_prompt=Reply with # headings` trained on "Reply with" (a YAML comment, silently);
    # `Answer: briefly` (a mapping), `yes` (a bool) and a digits-only revision (an octal integer, "got 42798") were refused.
    typed = {
        "data.system_prompt=Reply with # headings": ("data", "system_prompt", "Reply with # headings"),
        "data.system_prompt=Answer: briefly": ("data", "system_prompt", "Answer: briefly"),
        "data.system_prompt=yes": ("data", "system_prompt", "yes"),
        "model.revision=0123456": ("model", "revision", "0123456"),
        "output_name=1e3": (None, "output_name", "1e3"),
        # quotes are YAML's still; null is null; the everyday values are what they were
        "data.system_prompt='Say: hi'": ("data", "system_prompt", "Say: hi"),
        "data.system_prompt=null": ("data", "system_prompt", None),
        "data.system_prompt=": ("data", "system_prompt", ""),
        "data.source=embedded": ("data", "source", "embedded"),
        "model.name=random:mistral": ("model", "name", "random:mistral"),
    }
    for item, (section, key, want) in typed.items():
        cfg = load_config(profile="tiny", overrides=[item])
        assert getattr(getattr(cfg, section) if section else cfg, key) == want, item
    # Keys that are not text still read YAML: numbers, bools, lists.
    cfg = load_config(profile="tiny", overrides=["lora.r=4", "training.gradient_checkpointing=yes", "export.gguf=[f16]"])
    assert (cfg.lora.r, cfg.training.gradient_checkpointing, cfg.export.gguf) == (4, True, ["f16"])


def test_a_budget_given_in_one_unit_replaces_the_one_below_in_the_other(tmp_path):
    # The demo profile's budget is {minutes: 4}: `--set budget.hours=1` is one hour, not 1 h 4 min.
    assert load_config(profile="demo", overrides=["budget.hours=1"]).budget.seconds == 3600
    assert load_config(profile="demo", overrides=["budget.minutes=30"]).budget.seconds == 1800
    assert load_config(profile="demo", overrides=["budget.hours=1", "budget.minutes=30"]).budget.seconds == 5400  # one layer adds up
    assert load_config(profile="demo", overrides=["budget.vram_gb=12"]).budget.seconds == 240  # another budget key keeps the time
    # A profile's unit replaces the file defaults' other unit the same way.
    path = tmp_path / "pipeline.yaml"
    path.write_text("defaults:\n  model: {name: 'pypi:smollm2'}\n  data: {source: embedded}\n  budget: {hours: 4}\n"
                    "profiles:\n  quick: {budget: {minutes: 30}}\n  plain: {}\n")
    assert load_config(path, profile="quick").budget.seconds == 1800
    assert load_config(path, profile="plain").budget.seconds == 4 * 3600
    assert load_config(path, profile="quick", overrides=["budget.hours=2"]).budget.seconds == 7200
    # The section set whole gives its units in the --set layer too, so another unit set beside it adds (a review) ...
    assert load_config(profile="demo", overrides=["budget={minutes: 30}", "budget.hours=1"]).budget.seconds == 5400
    # ... and a unit set to null gives nothing: the profile's 4 minutes stay (it was "no budget" at 6d3543f).
    assert load_config(profile="demo", overrides=["budget.hours=null"]).budget.seconds == 240


def test_a_nan_budget_is_refused_in_one_line():
    for kw in ({"hours": float("nan")}, {"overrides": ["budget.minutes=.nan"]}):
        (p,) = _problems(profile="tiny", **kw)
        assert p.startswith("budget.") and "must be > 0 (got nan)" in p, p


NUMBER_KEYS = ["training.micro_batch_size", "training.grad_accum", "training.learning_rate", "training.warmup_ratio",
               "training.weight_decay", "training.max_grad_norm", "training.max_steps", "training.max_epochs",
               "training.checkpoint_minutes", "training.keep_checkpoints", "training.logging_steps", "training.seed",
               "training.neftune_noise_alpha", "training.unlikelihood_alpha", "training.gpus",
               "budget.hours", "budget.minutes", "budget.probe_warmup_steps", "budget.probe_steps",
               # the other sections' numbers read a bool as 1 or 0 too (`lora.r: true` was rank 1, `data.seed: false` seed 0)
               "data.max_rows", "data.heldout_size", "data.seed", "data.embedded_train", "data.embedded_heldout",
               "data.embedded_task_share", "data.embedded_keywords_added", "lora.r", "lora.alpha", "eval.max_prompts", "eval.max_new_tokens", "eval.batch_size",
               "eval.samples", "eval.reference_max_tokens", "eval.benchmark_seed", "merge.check_prompts", "export.gptq_samples"]


@pytest.mark.parametrize("key", NUMBER_KEYS)
def test_a_bool_in_a_number_key_is_one_line_naming_the_key_and_the_fix(key):
    """pydantic's lax mode read a bool as 1 or 0: `training.max_epochs: true` was one pass, `micro_batch_size: true` a
    micro-batch of one, `seed: false` seed 0 (and YAML reads yes/no and on/off as booleans too). Each is one line now."""
    for given in ("true", "false", "yes", "off"):
        (p,) = _problems(profile="tiny", overrides=[f"{key}={given}"])
        assert p.startswith(f"{key}: must be a number (got {given in ('true', 'yes')}: YAML reads"), p
        assert "; give " in p and "e.g." in p and "\n" not in p, p


def test_a_bool_max_epochs_in_the_file_names_the_key_and_the_fix(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("defaults:\n  model: {name: 'pypi:smollm2'}\n  data: {source: embedded}\n"
                    "profiles:\n  capped: {training: {max_epochs: true}}\n")
    (p,) = _problems(path=path, profile="capped")
    assert p == ("training.max_epochs: must be a number (got True: YAML reads true/false, yes/no and on/off as booleans); give "
                 "the passes over the rows, e.g. 2, or null for no cap"), p
    assert load_config(path, profile="capped", overrides=["training.max_epochs=2"]).training.max_epochs == 2.0  # numbers still are
    assert load_config(profile="tiny", overrides=["training.learning_rate=1e-4", "budget.hours=0.5"]).training.learning_rate == 1e-4


def test_every_number_key_is_in_number_keys():
    """A number key added later refuses a bool too: every int or float key of every section is in NUMBER_KEYS (the
    training and budget ones were; data, lora, eval, merge and export read `true` as 1, `false` as 0)."""
    import typing

    from pydantic import BaseModel

    from tasks.config import PipelineConfig

    numbers = set()
    for section, field in PipelineConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            for name, f in field.annotation.model_fields.items():
                if {int, float} & ({f.annotation} | set(typing.get_args(f.annotation))):
                    numbers.add(f"{section}.{name}")
    # the rest refuse both by their range (data.max_length >= 16, 0 < eval.confidence < 1) or their own validator
    # (lora.dropout, budget.vram_gb), or take no number alone (eval.benchmark_prompts, a mapping)
    for key in sorted(numbers - set(NUMBER_KEYS)):
        for given in ("true", "false"):
            (p,) = _problems(overrides=[f"{key}={given}"])
            assert p.startswith(f"{key}: "), p
