"""The architectures people train now, each as a tiny random model (2 layers, tiny dims) through the whole flow with
no LoRA key set; what LoRA reaches on each (all-linear, MoE experts); the model checks that run before stage 1; the
profiles and their one-line descriptions; warnings and Trainer output kept out of the run's log (issue 20)."""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
from packaging.version import Version

# PEFT 0.22 keeps a linear gate_proj / up_proj / down_proj as a module target beside the experts' fused weights (peft issues
# 3711, 3945); 0.21's v4-to-v5 conversion took those names for the experts' weights alone and left the linear layers bare.
PEFT_WRAPS_DENSE = Version(__import__("peft").__version__) >= Version("0.22")

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "initializer_range": 0.2}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
ATTN_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
EXPERTS = {"experts.gate_up_proj", "experts.down_proj"}
# GLM-4.5 and dots.llm1: a dense first layer (first_k_dense_replace), then routed experts beside a shared expert.
DENSE_THEN_MOE = {"head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                  "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}

# arch -> (random_config, linear layers all-linear must reach, expert weights it must reach)
ARCHS = {
    "llama": (TINY, ATTN_MLP, set()),
    "mistral": (TINY, ATTN_MLP, set()),
    "qwen2": (TINY, ATTN_MLP, set()),
    "qwen3": ({**TINY, "head_dim": 16}, ATTN_MLP, set()),
    "gemma2": ({**TINY, "head_dim": 16}, ATTN_MLP, set()),
    "gemma3_text": ({**TINY, "head_dim": 16}, ATTN_MLP, set()),
    # Gemma-3 4B/12B: the multimodal model type; LoRA on its text model only.
    "gemma3": ({"text_config": {**TINY, "head_dim": 16}, "mm_tokens_per_image": 4,
                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "image_size": 28, "patch_size": 14}}, ATTN_MLP, set()),
    "phi3": (TINY, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, set()),  # Phi-3 / Phi-4-mini
    "mixtral": ({**TINY, "num_local_experts": 4, "num_experts_per_tok": 2}, ATTN, EXPERTS),
    "qwen2_moe": ({**TINY, **MOE, "shared_expert_intermediate_size": 64}, ATTN_MLP, EXPERTS),  # shared expert = linear layers
    "qwen3_moe": ({**TINY, **MOE, "head_dim": 16}, ATTN, EXPERTS),
    "gpt_oss": ({**TINY, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16}, ATTN, EXPERTS),  # experts' biases stay frozen
    # Llama-4's text model: chunked attention on 3 layers of 4 (here chunks of 8 tokens), routed experts + a shared MLP.
    "llama4_text": ({**TINY, "head_dim": 16, "num_local_experts": 4, "intermediate_size_mlp": 128, "attention_chunk_size": 8},
                    ATTN_MLP, EXPERTS),
    # PEFT 0.21's v4-to-v5 conversion leaves their dense and shared MLPs without LoRA (PEFT_UNWRAPPED): attention + experts.
    "glm4_moe": ({**TINY, **DENSE_THEN_MOE}, ATTN_MLP if PEFT_WRAPS_DENSE else ATTN, EXPERTS),
    "dots1": ({**TINY, **DENSE_THEN_MOE}, ATTN_MLP if PEFT_WRAPS_DENSE else ATTN, EXPERTS),
}
DENSE_FIRST = ("glm4_moe", "dots1")  # layer 0 is dense: the routed experts sit in layer 1 alone

# Model types PEFT 0.21 converts as transformers-4 checkpoints (peft issue 3711) whose dense or shared MLPs keep plain
# gate_proj / up_proj / down_proj: PEFT 0.21 wraps none of them -> where the model line must say so.
PEFT_UNWRAPPED = {} if PEFT_WRAPS_DENSE else {
    arch: "mlp.gate_proj/up_proj/down_proj in layer 0, mlp.shared_experts.gate_proj/up_proj/down_proj in layer 1" for arch in DENSE_FIRST}
# Model types whose fused experts' gate_up_proj PEFT's conversion trains at 2 x lora.r when gate_proj and up_proj are targets.
PEFT_DOUBLES = ("qwen2_moe", "glm4_moe", "dots1")

# Each real-GPU profile of pipeline.yaml -> the architecture the matrix above runs for it.
PROFILE_ARCH = {
    "mistral-7b": "mistral", "llama-2-7b": "llama", "llama-3.1-8b": "llama", "qwen2.5-7b": "qwen2",
    "gemma-3-4b": "gemma3", "gemma-3-12b": "gemma3", "phi-4-mini": "phi3", "mistral-7b-v0.3": "mistral", "qwen3-moe-30b": "qwen3_moe",
}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _flow_args(art: str, arch: str, *extra: str) -> list[str]:
    return [f"artifacts_dir={art}", f"model.name=random:{arch}", f"model.random_config={json.dumps(ARCHS[arch][0])}", *extra]


@pytest.mark.parametrize("arch", list(ARCHS))  # ~4.5 s each on the 2-core box (2026-12-01): not marked slow
def test_tiny_architecture_runs_the_whole_flow_with_no_lora_key(arch, prefect_server, tmp_path, capfd):
    from flows.finetune import finetune

    _, linear, experts = ARCHS[arch]
    # The tiny profile sets lora.dropout 0 (speed); on a MoE the run takes auto, the default of every real profile but one.
    dropout = ["lora.dropout=auto"] if experts else []
    # 3 steps, not the profile's 12: what is checked here (targets, the merge's check, the card, warnings) needs an adapter
    # that moved, not 12 steps of it (15 runs: ~4-7 s a run less on the loaded 2-core box). A checkpoint at every step, so
    # each architecture still saves one mid-training (the 12 steps' periodic checkpoint, 3 s in, came once or not at all).
    steps = ["training.max_steps=3", "training.checkpoint_minutes=0.001"]
    capfd.readouterr()
    # The flow's log lines as Prefect's run logger emits them: its console handler can hold a stream an earlier test in
    # the same worker captured, so the terminal (capfd) missed the model line in a full suite run (make test, 2026-12-05).
    lines = _Lines()
    logging.getLogger("prefect.flow_runs").addHandler(lines)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = finetune(profile="tiny", overrides=_flow_args(str(tmp_path / "artifacts"), arch, *dropout, *steps))
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(lines)
    out, err = capfd.readouterr()
    assert result["status"] == "completed"
    train = result["stages"]["train"]["outputs"]
    targets = train["lora_targets"]
    assert set(targets["modules"]) == linear and set(targets["parameters"]) == experts, targets
    merge = result["stages"]["merge"]["outputs"]
    moe_layers = 1 if arch in DENSE_FIRST else 2  # of the 2 layers
    assert merge["check"]["passed"] and merge["merged_modules"] == 2 * len(linear) + moe_layers * len(experts)
    doubled = "PEFT trains the experts' gate_up_proj at rank 16, 2 x lora.r (its transformers-v4 conversion"
    assert (doubled in targets["rank_note"]) == (arch in PEFT_DOUBLES), targets  # the tiny profile's lora.r is 8
    card = (Path(result["published"]) / "README.md").read_text()
    assert (doubled in card) == (arch in PEFT_DOUBLES) and (any(doubled in m for m in lines.messages)) == (arch in PEFT_DOUBLES)
    if arch in PEFT_UNWRAPPED:  # the model line, the record and the card
        said = f"linear layers PEFT did not wrap ({PEFT_UNWRAPPED[arch]}: "
        assert any(said in n for n in targets["not_adapted"]) and said in card and any(said in m for m in lines.messages), targets
    if experts:
        assert targets["experts"] == 4 and "routed experts" in card and "not adapted" in card and "routers" in card and "never 4-bit" in card
        assert "dropout=0 (auto) on " in card and "LoRA dropout 0 (lora.dropout auto: PEFT's LoRA on expert weights takes none" in card
    # Quiet and current (issue 20.5): no FutureWarning from the run, no raw Trainer dicts between the log lines.
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []
    assert "{'loss'" not in out + err and "{'train_runtime'" not in out + err


# State-space and hybrid models: a Conv1d's [channels, 1, kernel] weight in every Mamba mixer, 3-D like MoE experts' weights.
SSM_ARCHS = {
    "mamba": {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 8},
    "falcon_h1": {**TINY, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "head_dim": 16},
    "jamba": {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
              "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 8},  # Mamba mixers + MoE layers
    # Qwen3-Next: gated-DeltaNet linear attention (its state runs along the row) in layer 0, full attention in layer 1; MoE.
    "qwen3_next": {**TINY, "head_dim": 16, **MOE, "shared_expert_intermediate_size": 64, "linear_num_value_heads": 4,
                   "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                   "layer_types": ["linear_attention", "full_attention"]},
}


# Other MoE layouts (issue 20, a review): DBRX keeps each layer's experts in 2-D [experts x ffn, hidden] matrices and its
# router's linear layer inside a DbrxRouter (transformers 5.24's DBRX needs rope_theta and clip_qkv in attn_config);
# LongCat-Flash a router.classifier, and 8 routed + 2 zero-computation experts in gate_up_proj; JetMoE routed experts in
# the attention (a mixture of attention heads) as well as in the feed-forward block, each with its own router.
MORE_MOE = {
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
    "longcat_flash": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
                      "zero_expert_num": 2, "moe_topk": 2, "moe_intermediate_size": 32, "ffn_hidden_size": 64, "q_lora_rank": 16, "kv_lora_rank": 16,
                      "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "head_dim": 8},
    "jetmoe": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "kv_channels": 16,
               "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2},
    # Doge's CDMoE: a dense MLP plus 16 experts kept as rows of two embedding tables, picked by a linear `router_gate`.
    # Inkling: routed experts' 3-D weights and its shared experts' 3-D weights too ([n_shared_experts, ., .]).
    "inkling_text": {**TINY, "head_dim": 16, "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "granitemoeshared": {**TINY, "num_local_experts": 4, "num_experts_per_tok": 2},
    "doge": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
             "is_moe": True, "num_experts": 16, "num_experts_per_tok": 2},
    # DeepSeek-V3: dense MLPs in the first layers (first_k_dense_replace) and a shared expert beside the routed ones in the rest,
    # all plain gate_proj / up_proj / down_proj; multi-head latent attention (its tiny configs need as many KV heads as heads).
    "deepseek_v3": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8},
}


def _skeleton(arch: str, device: str = "meta"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = ARCHS[arch][0] if arch in ARCHS else SSM_ARCHS[arch] if arch in SSM_ARCHS else MORE_MOE[arch]
    config = AutoConfig.for_model(arch, vocab_size=512, pad_token_id=0, **copy.deepcopy(kwargs))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config)


def test_all_linear_reaches_every_decoder_linear_whatever_its_name():
    from tasks.config import LoraSection
    from tasks.models import lora_targets

    for arch in ("llama", "phi3", "gemma3", "qwen2_moe", "mixtral"):
        t = lora_targets(_skeleton(arch), LoraSection())
        assert set(t.modules) == ARCHS[arch][1] and set(t.parameters) == ARCHS[arch][2], arch
    gemma = lora_targets(_skeleton("gemma3"), LoraSection())
    assert "vision_tower" in gemma.describe() and "vision" not in gemma.pattern  # the text model only
    qwen = lora_targets(_skeleton("qwen2_moe"), LoraSection())
    assert "routers (gate, shared_expert_gate" in qwen.describe()


def test_a_convolutions_3d_weight_is_not_a_routed_experts():
    """Mamba, Falcon-H1 and Jamba keep a Conv1d ([channels, 1, kernel]) in each mixer: all-linear once adapted it as "the
    routed experts' weights conv1d.weight (80 experts a layer)"; the MoE models still find their experts."""
    from tasks.config import LoraSection
    from tasks.models import lora_targets

    for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"):
        t = lora_targets(_skeleton(arch), LoraSection())
        assert set(t.parameters) == EXPERTS and t.experts == 4, (arch, t.describe())
    for arch in ("mamba", "falcon_h1"):
        t = lora_targets(_skeleton(arch), LoraSection())
        assert t.parameters == () and t.experts == 0 and "conv1d" not in t.describe(), (arch, t.describe())
    jamba = lora_targets(_skeleton("jamba"), LoraSection())
    assert set(jamba.parameters) == EXPERTS and jamba.experts == 4 and "conv1d" not in jamba.describe(), jamba.describe()
    # LongCat-Flash: gate_up_proj holds 8 routed + 2 zero-computation experts, down_proj the 8 (a review, 2026-12-02); the
    # line counts the 8 routed ones (it said "10 experts a layer")
    longcat = lora_targets(_skeleton("longcat_flash"), LoraSection())
    assert set(longcat.parameters) == EXPERTS and longcat.experts == 8 and "(8 experts a layer;" in longcat.describe(), longcat.describe()


def test_a_routers_own_linear_layer_is_never_adapted():
    """A router module holds a linear layer of its own: DBRX's ffn.router.layer, LongCat-Flash's mlp.router.classifier,
    JetMoE's mlp.router.layer and self_attention.experts.router.layer. all-linear adapted them as the linear layers `layer`
    and `classifier` while the same line said the routers stay as pretrained (a review): no LoRA inside a router."""
    import torch
    from peft import get_peft_model

    from tasks.config import LoraSection
    from tasks.models import lora_config, lora_targets

    for arch, router_linear in (("dbrx", "layer"), ("longcat_flash", "classifier"), ("jetmoe", "layer"), ("mixtral", "gate"),
                                ("qwen2_moe", "shared_expert_gate")):
        model = _skeleton(arch)
        t = lora_targets(model, LoraSection())
        assert router_linear not in t.modules and "not adapted: " in t.describe() and "the routers (" in t.describe(), (arch, t.describe())
        with torch.device("meta"):
            peft_model = get_peft_model(model, lora_config(LoraSection(), t))
        adapted = {n.split(".lora_")[0] for n, _ in peft_model.named_parameters() if ".lora_" in n}
        assert adapted and not [n for n in adapted if ".router." in n or n.endswith((".gate", ".router", "_gate"))], (arch, sorted(adapted))


def test_dbrxs_2d_expert_matrices_stay_frozen_and_the_line_says_why():
    """DBRX keeps each layer's experts as three 2-D [experts x ffn, hidden] matrices (mlp.w1, v1, w2) that DbrxExperts
    slices per expert before calling its mlp: PEFT's LoRA on a parameter wraps that mlp, so the slicing finds no w1 and the
    forward fails (checked here on a real tiny DBRX: when PEFT learns it, adapt them). They were frozen without a word."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.config import LoraSection
    from tasks.models import lora_targets

    t = lora_targets(_skeleton("dbrx"), LoraSection())
    assert t.parameters == () and set(t.modules) == {"Wqkv", "out_proj"}, t.describe()
    assert "not adapted: the routed experts (4 a layer; mlp.w1, mlp.v1, mlp.w2: each one 2-D [experts x ffn, hidden] matrix" in t.describe()
    assert "PEFT's LoRA on a parameter cannot wrap it; they stay as pretrained" in t.describe() and "dropout" not in t.describe()
    torch.manual_seed(0)
    model = get_peft_model(_skeleton("dbrx", "cpu"), LoraConfig(r=2, target_modules=[], target_parameters=["mlp.w1"]))
    with pytest.raises(AttributeError, match="no attribute 'v1'"):
        model(input_ids=torch.randint(3, 500, (1, 6)))


def test_jetmoes_attention_experts_are_counted_apart_from_its_feed_forward_experts():
    """JetMoE has routed experts in the attention (a mixture of attention heads) as well as in the feed-forward block; both
    share the weight names input_linear.weight / output_linear.weight, and the line said "(4 experts a layer" as if all were
    feed-forward experts (a review). The line and the model card count them apart."""
    from types import SimpleNamespace

    from tasks.config import LoraSection
    from tasks.models import lora_targets
    from tasks.publish import lora_targets_markdown

    t = lora_targets(_skeleton("jetmoe"), LoraSection())
    assert set(t.parameters) == {"input_linear.weight", "output_linear.weight"} and (t.experts, t.attention_experts) == (4, 4)
    counted = "(4 experts a layer in the feed-forward block and 4 in the attention, a mixture of attention heads;"
    assert counted in t.describe() and t.modules == ("kv_proj",), t.describe()
    card = lora_targets_markdown(SimpleNamespace(lora_targets=t.as_dict()), LoraSection())
    assert counted in card and "never 4-bit" in card and "LoRA dropout 0 (lora.dropout auto" in card, card
    for arch in ("mixtral", "qwen3_moe"):  # no attention experts: the line as it was
        t = lora_targets(_skeleton(arch), LoraSection())
        assert t.attention_experts == 0 and "(4 experts a layer; PEFT target_parameters)" in t.describe(), t.describe()


def test_linear_layers_peft_leaves_unwrapped_are_said_not_adapted():
    """PEFT 0.21 rewrites the LoraConfig of 30 MoE model types for adapters trained on transformers 4: on LongCat-Flash it
    takes the dense MLPs' gate_proj / up_proj / down_proj (model.layers.N.mlps.M) for the experts' fused weights, wraps
    none of them and trains the experts' gate_up_proj at twice lora.r (peft issue 3711). The line named them as adapted;
    it now says what PEFT wrapped. When PEFT stops doing this (its PR 3715), the first asserts fail: drop the note then."""
    import torch
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasks.config import LoraSection
    from tasks.models import lora_config, lora_targets, peft_quietly, peft_reach

    lora = LoraSection(r=8)
    t = lora_targets(_skeleton("longcat_flash"), lora)
    assert {"gate_proj", "up_proj", "down_proj"} <= set(t.modules), t.describe()
    # PEFT's note that the rank pattern it added was ignored (it is not: r below) was printed at each wrap, 10 lines a run
    # on a tiny DeepSeek-V3 (a review, 2026-12-04)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("meta"), peft_quietly():
            model = get_peft_model(_skeleton("longcat_flash"), lora_config(lora, t))
    assert not [w for w in caught if "_pattern keys did not match" in str(w.message)]
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert sorted(m.r["default"] for m in model.modules() if getattr(m, "parameter_name", None) == "gate_up_proj") == [16, 16]
    reached = peft_reach(model, t)
    doubled = ("PEFT trains the experts' gate_up_proj at rank 16, 2 x lora.r (its transformers-v4 conversion: one LoRA for the v4 "
               "gate_proj and up_proj, peft issue 3711)")
    assert reached.rank_note == doubled and doubled in reached.describe(), reached.describe()
    if PEFT_WRAPS_DENSE:  # PEFT 0.22: the dense MLPs are wrapped, the line names them as adapted and says nothing of them
        assert len([n for n in wrapped if ".mlps." in n]) == 12, wrapped
        assert reached.modules == t.modules and reached.not_adapted == t.not_adapted, reached.describe()
        return
    assert wrapped and not [n for n in wrapped if ".mlps." in n]  # what PEFT 0.21 does
    assert reached.modules == ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"), reached.describe()
    assert ("linear layers PEFT did not wrap (mlps.0.gate_proj/up_proj/down_proj in layers 0-1, mlps.1.gate_proj/up_proj/down_proj "
            "in layers 0-1: its "
            "transformers-v4 conversion takes these names for the experts' fused weights, peft issue 3711; they stay as pretrained)"
            ) in reached.describe(), reached.describe()
    for arch in ("mixtral", "jetmoe"):  # PEFT wraps what the line names at lora.r: nothing to add
        t = lora_targets(_skeleton(arch), lora)
        with torch.device("meta"), peft_quietly():
            assert peft_reach(get_peft_model(_skeleton(arch), lora_config(lora, t)), t) is t, arch


def test_the_line_names_where_peft_left_linear_layers_unwrapped():
    """DeepSeek-V3 (GLM-4.5, dots.llm1 alike) keeps a dense MLP in its first layers and a shared expert, which every token
    goes through, in the others, both plain gate_proj / up_proj / down_proj: PEFT 0.21's v4-to-v5 conversion leaves all of
    them without LoRA (peft issue 3711). The line said "gate_proj, up_proj, down_proj at model.layers.0.mlp.gate_proj and 11
    more", never naming the shared experts (a review, 2026-12-05); it names each place and its layers now."""
    import torch
    from peft import get_peft_model

    from tasks.config import LoraSection
    from tasks.models import lora_config, lora_targets, peft_quietly, peft_reach

    lora = LoraSection(r=8)
    t = lora_targets(_skeleton("deepseek_v3"), lora)
    with torch.device("meta"), peft_quietly():
        model = get_peft_model(_skeleton("deepseek_v3"), lora_config(lora, t))
    plain = [n.removeprefix("base_model.model.model.layers.") for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and n.endswith(("gate_proj", "up_proj", "down_proj"))]
    line = peft_reach(model, t).describe()
    if PEFT_WRAPS_DENSE:  # PEFT 0.22 wraps them all: nothing to name
        assert plain == [] and "did not wrap" not in line, (plain, line)
        return
    assert plain == [f"{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")] + [
        f"{i}.mlp.shared_experts.{p}" for i in (2, 3) for p in ("gate_proj", "up_proj", "down_proj")]  # what PEFT 0.21 does
    assert ("linear layers PEFT did not wrap (mlp.gate_proj/up_proj/down_proj in layers 0-1, mlp.shared_experts.gate_proj/up_proj/"
            "down_proj in layers 2-3: its transformers-v4 conversion takes these names for the experts' fused weights, peft issue 3711; "
            "they stay as pretrained)") in line, line


def test_every_model_type_peft_converts_names_the_linear_layers_it_left_unwrapped():
    """Every causal LM type that PEFT 0.21 converts like Qwen2-MoE (transformers' conversion mapping: DeepSeek-V2/V3/V3.2,
    GLM-4.5 and its Lite/DSA, dots.llm1, ERNIE-4.5-MoE, Qwen3-Next, Hunyuan-MoE, EXAONE-MoE, Cohere2-MoE, Solar-Open, AFMoE,
    Qwen3-MoE with a dense layer...), as a 3-layer skeleton with a dense first layer and shared experts where its config has
    them: each plain linear layer PEFT left unwrapped is named in the line, by place and name (AFMoE's attention gate_proj
    too)."""
    import torch
    from peft import get_peft_model
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tasks.config import LoraSection
    from tasks.models import lora_config, lora_targets, peft_quietly, peft_reach

    sizes = {**TINY, "num_hidden_layers": 3, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 512, "pad_token_id": 0,
             **DENSE_THEN_MOE, "num_experts": 4, "num_local_experts": 4, "num_shared_experts": 1, "num_dense_layers": 1,
             "shared_expert_intermediate_size": 64, "mlp_only_layers": [0], "q_lora_rank": 16, "kv_lora_rank": 16,
             "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}
    types = [t for t, base in _MODEL_TO_CONVERSION_PATTERN.items() if base == "qwen2_moe" and t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    named = {}
    for arch in types:
        default = CONFIG_MAPPING[arch]()
        with torch.device("meta"), peft_quietly(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = CONFIG_MAPPING[arch](**{k: v for k, v in sizes.items() if hasattr(default, k)})
            t = lora_targets(AutoModelForCausalLM.from_config(config), LoraSection(r=8))
            model = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(LoraSection(r=8), t))
        line = peft_reach(model, t).describe()
        plain = [n.split(".layers.", 1)[1].split(".", 1)[1] for n, m in model.named_modules()
                 if type(m) is torch.nn.Linear and ".layers." in n and n.endswith(("gate_proj", "up_proj", "down_proj"))]
        for path in plain:
            place, leaf = path.rsplit(".", 1)
            assert re.search(rf"(?:\(|, ){re.escape(place)}\.[\w/]*\b{leaf}\b[\w/]* in layers? \d", line), (arch, path, line)
        named[arch] = bool(plain)
    assert len(types) >= 15, types
    if PEFT_WRAPS_DENSE:  # PEFT 0.22 leaves none of them bare
        assert not any(named.values()), named
    else:
        assert all(named[a] for a in ("deepseek_v3", "glm4_moe", "dots1", "qwen3_next", "ernie4_5_moe")), named


def test_a_moe_under_a_profile_that_never_sets_lora_dropout_trains_without_it_and_says_so(shared_artifacts):
    """A profile that leaves lora.dropout alone (mistral-7b) with model.name switched to a MoE was refused before stage 1:
    "lora.dropout: 0.05 cannot apply to the routed experts' weights" (a review), although the user never set it. PEFT's
    LoRA on expert weights (ParamWrapper) refuses any dropout and one adapter has one, so auto gives the adapter none there
    and says so in the model line; a dense model, or a MoE whose experts stay frozen, keeps 0.05; a number > 0 the user
    set with expert weights targeted is still a one-line error (also test_model_problems_are_one_line_before_stage_1)."""
    from tasks.common import StageError
    from tasks.config import LoraSection, load_config
    from tasks.models import lora_config, lora_targets
    from tasks.preflight import check_model

    cfg = load_config(profile="mistral-7b", overrides=_flow_args(shared_artifacts, "mixtral"))
    assert cfg.lora.dropout == "auto"
    lines = check_model(cfg.model, cfg.lora, cfg.quant, "cpu", shared_artifacts)
    assert ("LoRA dropout 0 (lora.dropout auto: PEFT's LoRA on expert weights takes none, so the adapter has none; auto is 0.05 "
            "without them); not adapted: the routers") in lines[0], lines
    t = lora_targets(_skeleton("mixtral"), cfg.lora)
    assert t.dropout == 0 and lora_config(cfg.lora, t).lora_dropout == 0 and t.as_dict()["dropout"] == 0
    # A multi-GPU run's ranks re-read lora from the launch spec (tasks/engine/launch.py): auto survives, and resolves alike.
    assert LoraSection.model_validate(cfg.lora.model_dump(mode="json")).dropout == "auto"
    dense = lora_targets(_skeleton("llama"), cfg.lora)
    assert dense.dropout == 0.05 and lora_config(cfg.lora, dense).lora_dropout == 0.05 and "dropout" not in dense.describe()
    frozen_experts = lora_targets(_skeleton("mixtral"), cfg.lora.model_copy(update={"target_modules": ["q_proj", "v_proj"]}))
    assert frozen_experts.dropout == 0.05 and "dropout" not in frozen_experts.describe()
    with pytest.raises(StageError) as e:
        lora_targets(_skeleton("mixtral"), cfg.lora.model_copy(update={"dropout": 0.1}))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("lora.dropout: 0.1 cannot apply to the routed experts' weights") and "set lora.dropout=0" in msg


def test_a_target_peft_refuses_is_one_line_before_stage_1(shared_artifacts):
    """PEFT takes no LoRA on a Mamba model's out_proj: said by the model check naming lora.target_modules and the layers
    it can take, not as a traceback from stage 3."""
    from tasks.common import StageError
    from tasks.config import load_config
    from tasks.preflight import check_model

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "model.name=random:mamba",
                                                 f"model.random_config={json.dumps(SSM_ARCHS['mamba'])}"])
    with pytest.raises(StageError) as e:
        check_model(cfg.model, cfg.lora, cfg.quant, "cpu", shared_artifacts)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("lora.target_modules: PEFT cannot adapt this model"), msg
    assert "out_proj" in msg and "set lora.target_modules=[in_proj,x_proj,dt_proj]" in msg, msg
    fixed = cfg.lora.model_copy(update={"target_modules": ["in_proj", "x_proj", "dt_proj"]})
    assert check_model(cfg.model, fixed, cfg.quant, "cpu", shared_artifacts)[0].startswith("model: LoRA on in_proj, x_proj, dt_proj")


def test_models_that_carry_state_along_a_row_train_padded_not_packed(shared_artifacts):
    """A state-space, linear-attention or convolution layer reads a packed row as one sequence: one conversation's state
    reaches the next (a packed Jamba's second sample differs from it alone; an attention model's does not, to 1e-6). So
    the model check names such layers: training.engine auto trains them padded (engine_for), and an explicit packed
    engine is one line naming the key before stage 1. Attention-only models, sliding windows and attention sinks
    included, keep the packed engines."""
    import torch

    from tasks.common import StageError
    from tasks.config import load_config
    from tasks.engine.build import engine_for
    from tasks.engine.collate import PaddedCollator
    from tasks.engine.fastpath import PaddingFreeCollator
    from tasks.models import recurrent_layers_of
    from tasks.preflight import check_model

    for arch in ("mamba", "falcon_h1", "jamba", "qwen3_next"):
        assert recurrent_layers_of(_skeleton(arch).config), arch
    for arch in ("llama", "mistral", "gemma3", "qwen2_moe", "mixtral", "gpt_oss", "phi3"):
        assert recurrent_layers_of(_skeleton(arch).config) is None, arch
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 500, (n,), generator=g).tolist()} for n in (7, 9)]
    batch = {k: v for k, v in PaddingFreeCollator()(rows).items() if k != "labels"}
    for arch, leaks in (("jamba", True), ("llama", False)):
        torch.manual_seed(0)
        model = _skeleton(arch, "cpu").float().eval()
        with torch.no_grad():
            packed, alone = model(**batch).logits[0, 7:], model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
        assert ((packed - alone).abs().max() > 1e-4) == leaks, arch
    # Qwen3-Next on CPU (transformers' reference kernels): the padded engine's rows are each conversation alone (transformers
    # refuses a packed row there without flash-linear-attention), and auto trains it padded on CUDA too.
    torch.manual_seed(0)
    model = _skeleton("qwen3_next", "cpu").float().eval()
    padded = {k: v for k, v in PaddedCollator(0)([{**r, "labels": r["input_ids"]} for r in rows]).items() if k != "labels"}
    with torch.no_grad():
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            assert (model(**padded).logits[i, :len(alone)] - alone).abs().max() < 1e-5, i
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "model.name=random:qwen3_next",
                                                 f"model.random_config={json.dumps(SSM_ARCHS['qwen3_next'])}"])
    assert recurrent_layers_of(model.config) == "linear_attention layers"
    assert {engine_for(cfg.training, d, recurrent_layers_of(model.config)) for d in ("cpu", "cuda")} == {"padded"}
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "model.name=random:jamba",
                                                 f"model.random_config={json.dumps(SSM_ARCHS['jamba'])}"])
    recurrent = recurrent_layers_of(_skeleton("jamba").config)
    assert engine_for(cfg.training, "cuda", recurrent) == "padded" and engine_for(cfg.training, "cuda", None) == "fused"
    assert engine_for(cfg.training.model_copy(update={"engine": "fused"}), "cuda", recurrent) == "fused"  # explicit: preflight refuses it
    for engine in ("fast", "fused"):
        with pytest.raises(StageError) as e:
            check_model(cfg.model, cfg.lora, cfg.quant, "cpu", shared_artifacts, engine=engine)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"training.engine: {engine} packs conversations into one row") and "mamba" in msg, msg
        assert msg.endswith("set training.engine: padded (auto picks it for this model)"), msg
    assert check_model(cfg.model, cfg.lora, cfg.quant, "cpu", shared_artifacts, engine="padded")


def test_explicit_targets_still_work_and_a_wrong_name_lists_the_models_names():
    from tasks.common import StageError
    from tasks.config import LoraSection
    from tasks.models import lora_targets

    mixtral = _skeleton("mixtral")
    attn_only = lora_targets(mixtral, LoraSection(target_modules=["q_proj", "v_proj"]))
    assert attn_only.modules == ("q_proj", "v_proj") and attn_only.parameters == ()
    assert "not adapted: the routed experts" in attn_only.describe()  # said, never silent
    with_experts = lora_targets(mixtral, LoraSection(target_modules=["q_proj", "down_proj"]))
    assert with_experts.parameters == ("experts.down_proj",)
    with pytest.raises(StageError) as e:
        lora_targets(_skeleton("phi3"), LoraSection(target_modules=["q_proj", "qkv_proj"]))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("lora.target_modules: q_proj not in this model")
    assert "qkv_proj, gate_up_proj" in msg.replace("o_proj, ", "") and "all-linear" in msg


def test_naming_dbrxs_2d_expert_matrices_says_they_stay_frozen_and_why():
    """lora.target_modules=[w1] on DBRX answered "w1 not in this model", but w1 is in it: the experts' 2-D
    [experts x ffn, hidden] matrix the project keeps frozen because PEFT's wrap breaks DBRX's forward (a review). The
    line says what w1 is, that it stays frozen and why, and what to name instead; by its parameter name, as mlp.w1 or by
    its module's name."""
    from tasks.common import StageError
    from tasks.config import LoraSection
    from tasks.models import lora_targets

    dbrx = _skeleton("dbrx")
    for names, said, weights in ((["w1"], "w1 is", "mlp.w1,"), (["Wqkv", "mlp.v1", "w2"], "mlp.v1, w2 are", "mlp.v1, mlp.w2,"),
                                 (["mlp"], "mlp is", "mlp.w1, mlp.v1, mlp.w2,")):
        with pytest.raises(StageError) as e:
            lora_targets(dbrx, LoraSection(target_modules=names))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"lora.target_modules: {said} in this model but stay"), msg
        assert f"frozen: the routed experts' weights {weights} each one 2-D [experts x ffn, hidden] matrix ([4 x 32, 64] here)" in msg, msg
        assert "PEFT's LoRA on a parameter (which wraps that module) breaks the forward" in msg, msg
        assert msg.endswith("name linear layers instead (Wqkv, out_proj) or use all-linear, which adapts those and leaves the experts as "
                            "pretrained"), msg
    with pytest.raises(StageError) as e:  # a name the model lacks is still said, in the same line
        lora_targets(dbrx, LoraSection(target_modules=["w1", "q_proj"]))
    assert "w1 is in this model but stays frozen" in str(e.value) and "; q_proj not in this model; its linear layers are: Wqkv, out_proj" in str(e.value)
    assert lora_targets(dbrx, LoraSection(target_modules=["Wqkv"])).modules == ("Wqkv",)


def test_expert_weights_are_named_as_the_model_names_them():
    """JetMoE's expert weights could only be named `weight` (the last name of input_linear.weight / output_linear.weight),
    which names every linear layer's parameter too (PEFT's target_parameters matches it on all of them). An expert weight
    is named as the model line writes it (`<module>.<parameter>`: input_linear.weight, experts.gate_up_proj), by its
    module (input_linear, experts) or, where that says which, by its parameter's own name (gate_up_proj); a bare `weight`
    is a one-line error that names them."""
    import torch
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasks.common import StageError
    from tasks.config import LoraSection
    from tasks.models import lora_config, lora_targets

    def targets(arch, *names):
        t = lora_targets(_skeleton(arch), LoraSection(target_modules=list(names), dropout=0.0))
        return t.modules, t.parameters

    assert targets("jetmoe", "input_linear") == ((), ("input_linear.weight",))
    assert targets("jetmoe", "kv_proj", "output_linear.weight") == (("kv_proj",), ("output_linear.weight",))
    assert targets("mixtral", "experts") == ((), ("experts.gate_up_proj", "experts.down_proj"))
    assert targets("mixtral", "q_proj", "experts.down_proj") == (("q_proj",), ("experts.down_proj",))
    assert targets("mixtral", "gate_up_proj") == ((), ("experts.gate_up_proj",))  # the parameter's own name, as before
    with pytest.raises(StageError) as e:
        targets("jetmoe", "weight")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("lora.target_modules: weight names a parameter of every linear layer"), msg
    assert msg.endswith("name those as the model does: input_linear.weight, output_linear.weight, or their modules: input_linear, "
                        "output_linear"), msg
    with pytest.raises(StageError) as e:  # the names a wrong one is told about are names that work
        targets("mixtral", "w1")
    assert "; its routed experts' weights: experts.gate_up_proj, experts.down_proj; or use all-linear" in str(e.value)
    # What PEFT wraps: both input_linear modules (the feed-forward and the attention experts), no linear layer.
    model = _skeleton("jetmoe")
    lora = LoraSection(target_modules=["input_linear"], dropout=0.0)
    with torch.device("meta"):
        wrapped = get_peft_model(model, lora_config(lora, lora_targets(model, lora)))
    names = sorted(n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
                   if isinstance(m, BaseTunerLayer) and ".base_layer" not in n)
    assert names == ["model.layers.0.mlp.input_linear", "model.layers.0.self_attention.experts.input_linear",
                     "model.layers.1.mlp.input_linear", "model.layers.1.self_attention.experts.input_linear"], names


def test_a_router_is_kept_out_by_where_it_is_not_by_its_name():
    """Routers were kept out of LoRA by their inner module's name: DBRX's router holds a linear `layer`, so a model with a
    linear `layer` elsewhere adapted it and wrapped the routers too (the pattern matched every `layer`). The routers are
    found once, as modules, and kept out by their path: a non-router `layer` is adapted, the router's is not; a linear
    layer at a router's place in a block without experts (block 0's ffn.router here) is no router and is adapted."""
    import re

    import torch
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasks.config import LoraSection
    from tasks.models import lora_config, lora_targets

    def wrapped_after(model):
        t = lora_targets(model, LoraSection())
        with torch.device("meta"):
            peft_model = get_peft_model(model, lora_config(LoraSection(), t))
        return t, sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                         if isinstance(m, BaseTunerLayer) and ".base_layer" not in n)

    model = _skeleton("dbrx")
    for block in model.transformer.blocks:
        with torch.device("meta"):
            block.norm_attn_norm.attn.layer = torch.nn.Linear(64, 64)  # not a router, named like DBRX's router's own
    t, wrapped = wrapped_after(model)
    assert "layer" in t.modules and "the routers (router:" in t.describe(), t.describe()
    assert [n for n in wrapped if n.endswith(".layer")] == ["transformer.blocks.0.norm_attn_norm.attn.layer",
                                                            "transformer.blocks.1.norm_attn_norm.attn.layer"], wrapped
    assert not re.fullmatch(t.pattern, "transformer.blocks.1.ffn.router.layer")
    model = _skeleton("dbrx")
    dense = torch.nn.Module()  # block 0 without experts: its `router` routes nothing
    with torch.device("meta"):
        dense.router = torch.nn.Linear(64, 64)
    model.transformer.blocks[0].ffn = dense
    t, wrapped = wrapped_after(model)
    assert "router" in t.modules and "transformer.blocks.0.ffn.router" in wrapped, wrapped
    assert not [n for n in wrapped if n.startswith("transformer.blocks.1.ffn.router")], wrapped
    # On the model types PEFT converts from transformers 4 (Qwen2-MoE's family, Mixtral's), PEFT turns the pattern into bare
    # names and a linear `gate` into the routers' `gate.weight`, wrapping every router whatever the pattern says: a linear
    # layer named like the routers stays frozen there, and the line says so.
    model = _skeleton("qwen3_moe")
    dense = torch.nn.Module()  # block 0 without experts, with a linear `gate` (block 1's router is a `gate` too)
    with torch.device("meta"):
        dense.gate = torch.nn.Linear(64, 64)
    model.model.layers[0].mlp = dense
    t, wrapped = wrapped_after(model)
    assert "gate" not in t.modules and not [n for n in wrapped if ".gate" in n], wrapped
    assert ("linear layers named like the routers (gate at model.layers.0.mlp.gate: PEFT's transformers-v4 conversion takes that "
            "name for the routers' weight on this model type and would adapt every router, peft issue 3711; they stay as pretrained)"
            ) in t.describe(), t.describe()
    for arch in ("mixtral", "qwen2_moe", "jetmoe"):  # no name collides: the pattern as it was
        assert "(?!" not in lora_targets(_skeleton(arch), LoraSection()).pattern, arch


def test_dogess_router_gate_is_a_router_and_its_expert_tables_are_said():
    """Doge's CDMoE routes with a linear `router_gate` (a `router_*`, not `gate` / `router`) to experts kept as rows of
    two embedding tables: all-linear adapted the router and the line never named the experts (the random:<moe-arch>
    survey of this branch). The router stays as pretrained, the tables are said not adapted."""
    from tasks.config import LoraSection
    from tasks.models import lora_targets

    t = lora_targets(_skeleton("doge"), LoraSection())
    assert "router_gate" not in t.modules and set(t.modules) == {"q_proj", "k_proj", "v_proj", "dt_proj", "o_proj", "gate_proj",
                                                                    "up_proj", "down_proj"}, t.describe()
    assert ("not adapted: the routed experts (16 a layer; down_embed, up_embed: embedding tables with a row per expert, which LoRA on "
            "linear layers does not reach; they stay as pretrained); the routers (router_gate: kept as pretrained") in t.describe(), t.describe()
    assert t.dropout == 0.05  # nothing PEFT wraps as a parameter: the usual dropout


def test_shared_experts_kept_in_3d_weights_are_not_called_routed():
    """Inkling keeps its shared experts (every token goes through them) in 3-D weights as well: the line called
    shared_experts.gate_proj... "the routed experts' weights" beside experts.gate_up_proj (the random:<moe-arch> survey of
    this branch). They are adapted as before, named apart; a list that leaves either kind out says so."""
    from types import SimpleNamespace

    from tasks.config import LoraSection
    from tasks.models import lora_targets
    from tasks.publish import lora_targets_markdown

    shared = ("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj")
    t = lora_targets(_skeleton("inkling_text"), LoraSection())
    assert t.parameters == ("experts.gate_up_proj", "experts.down_proj", *shared) and t.shared_parameters == shared and t.experts == 4
    line = ("the routed experts' weights experts.gate_up_proj, experts.down_proj and the shared experts' weights "
            f"{', '.join(shared)} (4 experts a layer;")
    assert line in t.describe() and line in lora_targets_markdown(SimpleNamespace(lora_targets=t.as_dict()), LoraSection()), t.describe()
    only_shared = lora_targets(_skeleton("inkling_text"), LoraSection(target_modules=["q_proj", "shared_experts"], dropout=0))
    assert (f"+ the shared experts' weights {', '.join(shared)} (every token goes through them; PEFT target_parameters); not adapted: "
            "the routed experts (experts.gate_up_proj, experts.down_proj: name them") in only_shared.describe(), only_shared.describe()
    routed_only = lora_targets(_skeleton("inkling_text"), LoraSection(target_modules=["experts"], dropout=0))
    assert f"not adapted: the shared experts ({', '.join(shared)}: name them" in routed_only.describe(), routed_only.describe()
    granite = lora_targets(_skeleton("granitemoeshared"), LoraSection())  # its routed experts' class is GraniteMoeSharedExperts
    assert granite.shared_parameters == () and "the routed experts' weights experts.gate_up_proj" in granite.describe(), granite.describe()


def _run_cli(capfd, *args: str) -> tuple[int, str]:
    import logging
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli import main

    for h in logging.getLogger().handlers:  # Prefect's console handler may hold an earlier test's closed capture
        if isinstance(h, PrefectConsoleHandler):
            h.stream = h.console.file = sys.stderr
    capfd.readouterr()
    code = main(["run", "--profile", "tiny", "--minutes", "1", *[x for a in args for x in ("--set", a)]])
    out, err = capfd.readouterr()
    return code, out + err


@pytest.mark.parametrize("case, sets, needles", [
    ("wrong-target", ["lora.target_modules=[q_proj,qkv_proj]"], ["qkv_proj not in this model", "its linear layers are"]),
    ("moe-dropout", ["model.name=random:mixtral", f"model.random_config={json.dumps(ARCHS['mixtral'][0])}", "lora.dropout=0.05"],
     ["lora.dropout: 0.05", "routed experts", "set lora.dropout=0"]),
    ("template-without-eos", ["model.chat_template={% for m in messages %}{{ m['role'] }}: {{ m['content'] }} END\n{% endfor %}"],
     ["chat template ends assistant turns with", "can't learn to stop", "model.chat_template"]),
    ("template-syntax", ["model.chat_template={% for m in messages %}{{ m['content'] }"],
     ["model.chat_template: not valid Jinja: unexpected '}' (line 1)", "fix the template"]),
    ("template-raises", ["model.chat_template={{ raise_exception('no chat here') }}"],
     ["model.chat_template: cannot render a user + assistant exchange: no chat here (line 1)", "set model.chat_template"]),
    # a template's own runtime error (not a jinja2.TemplateError) escaped as a traceback (issue 20, a review)
    ("template-runtime-error", ["model.chat_template={{ (messages | length) // 0 }}{% for m in messages %}{{ m['content'] }}{% endfor %}"],
     ["model.chat_template: cannot render a user + assistant exchange: ZeroDivisionError: integer division or modulo by zero (line 1)"]),
    # a template that drops the assistant's text was blamed on EOS ("ends assistant turns with ''")
    ("template-drops-answers", ["model.chat_template={% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{{ eos_token }}{% endfor %}"],
     ["model.chat_template: renders no assistant text", "{{ message['content'] }}"]),
    # a later answer not opened by the generation prompt (one exchange renders fine): stage 1 died on the first multi-turn
    # row with a line naming neither the key nor the row
    ("template-later-answer-unmarked", ["model.chat_template={% for m in messages %}{% if m['role'] == 'user' %}{{ 'U: ' + m['content'] + "
                                        "'\n' }}{% else %}{{ 'A' + (loop.index ~ '') * (loop.index > 2) + ': ' + m['content'] + eos_token + "
                                        "'\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"],
     ["model.chat_template: does not open an assistant turn the way its generation prompt does", "as 'hi\\nA: Okapi</s>\\nU: And then?\\nA4: Okapi again.",
      "set model.chat_template to a template whose generation prompt is the start of its assistant turns"]),
    # Gemma-2's template refuses a system turn: with data.system_prompt set, stage 1 once died after 48 s.
    ("system-refused", ["data.system_prompt=Answer briefly.", "model.chat_template={% for m in messages %}\n{% if m['role'] == "
                        "'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{{ eos_token }}{% endfor %}"],
     ["model.chat_template: refuses the system turn that data.system_prompt adds: System role not supported (line 2)",
      "unset data.system_prompt"]),
])
def test_model_problems_are_one_line_before_stage_1(case, sets, needles, prefect_server, tmp_path, capfd):
    art = tmp_path / "artifacts"
    code, output = _run_cli(capfd, f"artifacts_dir={art}", *sets)
    assert code == 1, output[-3000:]
    lines = [l for l in output.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), lines
    assert "Traceback" not in output
    assert not (art / "cache" / "data").exists()  # found before stage 1 did any work


def test_too_few_rows_for_a_heldout_split_names_the_count_and_the_key(tmp_path, tiny_cfg, shared_artifacts):
    """An OASST1 export filtered to one language that leaves 1 conversation: the length is not the cause."""
    from tasks.common import StageError
    from tasks.data import load_dataset_records

    rows = []
    for t, lang in enumerate(["es", "en", "en", "de"]):
        root = f"t{t}"
        rows.append({"message_id": root, "parent_id": None, "message_tree_id": root, "role": "prompter", "text": f"Pregunta {t}?",
                     "lang": lang, "rank": None, "deleted": False})
        rows.append({"message_id": f"{root}-a", "parent_id": root, "message_tree_id": root, "role": "assistant", "text": f"Respuesta {t}.",
                     "lang": lang, "rank": 0, "deleted": False})
    src = tmp_path / "oasst_export.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tiny_cfg.data.model_copy(update={"source": str(src), "language": "es"})
    with pytest.raises(StageError) as e:
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    msg = str(e.value)
    assert "0 usable held-out rows: 1 usable conversation after filtering" in msg and "needs at least 2" in msg
    assert "data.language (now 'es'" in msg and "max_length" not in msg


@pytest.mark.parametrize("overlong, fix", [("drop", "raise data.max_length (now 256) or set data.overlong=truncate"),
                                            ("turns", "raise data.max_length (now 256) or set data.overlong=truncate")])
def test_a_heldout_row_dropped_for_its_length_names_a_fix_that_keeps_it(overlong, fix, tmp_path, tiny_cfg, shared_artifacts):
    """The held-out split is a whole conversation each: when the one held out is over data.max_length, the line said "set
    data.overlong=turns", which keeps no conversation whose first answer does not fit, so the run stopped the same way
    again (a review, 2026-12-04). truncate keeps it; the line counts the conversation and names max_length's value."""
    import random

    from tasks.common import StageError
    from tasks.data import load_dataset_records

    order = list(range(3))
    random.Random(tiny_cfg.data.seed).shuffle(order)  # the data stage's seeded split: order[0] is the one held out
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}. " * (400 if i == order[0] else 1)}]} for i in range(3)]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tiny_cfg.data.model_copy(update={"source": str(src), "max_length": 256, "overlong": overlong})
    with pytest.raises(StageError) as e:
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    msg = str(e.value)
    assert "0 usable held-out rows: the 1 held-out conversation was dropped while formatting (dropped over max_length: 1)" in msg, msg
    assert msg.endswith(fix), msg
    kept = load_dataset_records(data.model_copy(update={"overlong": "truncate"}), tiny_cfg.model, shared_artifacts)
    assert kept.n_heldout == 1


def test_checkpointing_and_peft_calls_use_current_names(tiny_cfg, shared_artifacts):
    """No FutureWarning for transformers' renamed checkpointing names (removed in v6) from building the model with
    checkpointing on, PEFT's wrap and the Trainer arguments (issue 20.5)."""
    from tasks.engine.build import build_model, training_args
    from tasks.models import resolve_model

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(ref, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, True, "cpu", "padded")
        args = training_args(tiny_cfg.training, Path(shared_artifacts) / "args", "cpu", tiny_cfg.quant, micro_batch_size=2, grad_accum=1,
                             max_steps=1, gradient_checkpointing=True)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.get_base_model().modules())  # on, as asked
    assert not getattr(args, "activation_checkpointing", args.gradient_checkpointing)  # Trainer leaves it to the model


def test_profiles_command_prints_each_profile_with_its_description(capsys):
    from flows.cli import main
    from tasks.config import load_config, profile_descriptions

    assert main(["profiles"]) == 0
    out = capsys.readouterr().out.splitlines()
    described = profile_descriptions()
    assert len(out) == len(described)
    for name, text in described.items():
        assert text, f"profile {name} has no description"
        assert any(line.split()[0] == name and text in line for line in out), (name, out)
    for name, arch in PROFILE_ARCH.items():
        assert name in described and arch in ARCHS  # each real-GPU profile's architecture runs in the tiny matrix
        cfg = load_config(profile=name)
        assert cfg.description and cfg.budget.vram_gb == "auto"
    assert load_config(profile="qwen3-moe-30b").lora.dropout == 0  # PEFT's expert LoRA takes no dropout


def test_moe_qlora_keeps_the_experts_16_bit_and_says_so(shared_artifacts):
    """NF4 on CPU (quant.cpu_fallback=qlora, bf16 compute): bitsandbytes quantizes the linear layers, the 3-D experts stay
    bf16, and the k-bit prep must not upcast them to fp32 as PEFT's does with every 16-bit weight (2x their memory)."""
    import torch

    from tasks.config import load_config
    from tasks.engine.build import build_model
    from tasks.models import resolve_model
    from tasks.preflight import check_model

    cfg = load_config(profile="tiny", overrides=[*_flow_args(shared_artifacts, "mixtral")[1:], "quant.cpu_fallback=qlora",
                                                 "quant.compute_dtype=bfloat16"])
    lines = check_model(cfg.model, cfg.lora, cfg.quant, "cpu", shared_artifacts)
    assert any("routed experts (" in l and "stay in bfloat16, not NF4" in l for l in lines), lines
    model = build_model(resolve_model(cfg.model, shared_artifacts), cfg.model, cfg.quant, cfg.lora, True, "cpu", "padded")
    params = dict(model.named_parameters())
    experts = {n: p for n, p in params.items() if p.ndim == 3}
    assert len(experts) == 4 and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in experts.values())
    assert all(p.dtype == torch.float32 for n, p in params.items() if "norm" in n)  # the rest of PEFT's prep still applies
    assert any(type(p).__name__ == "Params4bit" for p in params.values())
    x = torch.randint(3, 500, (2, 12))
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in params.items() if p.requires_grad and "experts" in n and "lora_B" in n)


def test_experts_alone_can_be_the_target():
    from peft import get_peft_model

    from tasks.config import LoraSection
    from tasks.models import lora_config, lora_targets

    model = _skeleton("mixtral")
    lora = LoraSection(target_modules=["gate_up_proj", "down_proj"], dropout=0.0)
    t = lora_targets(model, lora)
    assert t.modules == () and set(t.parameters) == EXPERTS and t.pattern == ""
    peft_model = get_peft_model(model, lora_config(lora, t))
    adapted = {n.split(".lora_")[0] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapted and all(".mlp.experts" in n for n in adapted)


def _gemma3_cfg(shared_artifacts: str, *extra: str):
    """The tiny profile on a random Gemma3ForConditionalGeneration with 2 text decoder layers and 3 vision layers."""
    from tasks.config import load_config

    config = {**ARCHS["gemma3"][0], "vision_config": {**ARCHS["gemma3"][0]["vision_config"], "num_hidden_layers": 3}}
    return load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "model.name=random:gemma3",
                                                  f"model.random_config={json.dumps(config)}", *extra])


def test_a_multimodal_models_vision_layers_are_not_decoder_layers_to_count_free_or_offload(shared_artifacts):
    """Issue 20: Gemma-3 4B is a Gemma3ForConditionalGeneration whose text model has 34 decoder layers and whose SigLIP
    vision tower 27 encoder layers, all of them transformers GradientCheckpointingLayers; the probe counted 61 and timed
    "61 layers without recompute". The layers counted, freed from recompute and offloaded around are the text decoder's
    (here 2, beside 3 vision layers); freeing more than there are frees the decoder's and says how many; a text-only
    forward and backward recomputes exactly the decoder layers left checkpointed and never runs the vision tower."""
    import torch

    from tasks.engine import recompute
    from tasks.engine.build import build_model
    from tasks.engine.collate import collator_for
    from tasks.models import resolve_model

    cfg = _gemma3_cfg(shared_artifacts, "lora.dropout=0")
    model = build_model(resolve_model(cfg.model, shared_artifacts), cfg.model, cfg.quant, cfg.lora, True, "cpu", "padded")
    text = model.get_base_model().model.language_model
    vision = list(model.get_base_model().model.vision_tower.encoder.layers)
    assert len(vision) == 3 and all(v.gradient_checkpointing for v in vision)  # checkpointing on in the whole model

    layers = recompute.checkpointed_layers(model)
    assert len(layers) == 2 and layers == list(text.layers)  # the 2 decoder layers, not 2 + 3
    assert recompute.decoder_stack(model) is text  # the offloaded stack: the text model, not the multimodal one
    assert recompute.set_recompute_free_layers(model, 5) == 2  # all the decoder has (the probe's search stops there)
    assert [layer.gradient_checkpointing for layer in text.layers] == [False, False]

    assert recompute.set_recompute_free_layers(model, 1) == 1
    assert [layer.gradient_checkpointing for layer in text.layers] == [True, False]  # the last decoder layer freed
    calls = {}
    for layer in [*vision, *text.layers]:
        layer.mlp.register_forward_hook(lambda m, *a: calls.__setitem__(m, calls.get(m, 0) + 1))
    model.train()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 500, (n,), generator=g).tolist()), "labels": ids} for n in (12, 9)]
    model(**collator_for("padded", 0, model)(rows)).loss.backward()
    # A checkpointed layer runs twice (forward, recompute in the backward), a freed one once; the vision tower never.
    assert [calls.get(layer.mlp, 0) for layer in text.layers] == [2, 1]
    assert [calls.get(v.mlp, 0) for v in vision] == [0, 0, 0]


def test_the_probes_layer_search_counts_a_multimodal_models_decoder_layers_only(shared_artifacts, tmp_path, monkeypatch):
    """Stage 3's search for layers to free from recompute, on a simulated GPU with room for every layer (each trial timed
    for real, on the CPU): it measures 2 freed layers (4 clipped to the text decoder's 2) and stops; the record, its
    trials and the log say 2. Before, it counted the vision tower's 3 as well and timed 4, then "5 layers without recompute"."""
    import tasks.probe as probe_mod
    from tasks.data import load_dataset_records

    cfg = _gemma3_cfg(shared_artifacts, "training.engine=padded", "training.gradient_checkpointing=true",
                      "training.offload_activations=off", "budget.vram_gb=1000")
    real = probe_mod._time_setting

    def on_cpu(ref, model_cfg, quant, lora, training, budget, device, *rest, **kwargs):
        return real(ref, model_cfg, quant, lora, training, budget, "cpu", *rest, **kwargs)

    monkeypatch.setattr(probe_mod, "_time_setting", on_cpu)
    monkeypatch.setattr(probe_mod, "hardware_id", lambda device, gpus=1: "cuda:simulated")
    data = load_dataset_records(cfg.data, cfg.model, shared_artifacts)
    logs = []
    rec = probe_mod._probe(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cuda", "k", tmp_path / "probe",
                           shared_artifacts, logs.append)
    assert [t["recompute_free_layers"] for t in rec.trials] == [0, 2]
    assert {t["layers"] for t in rec.trials} == {2} and rec.recompute_free_layers in (0, 2)
    assert any("(2 layers without recompute)" in m for m in logs) and not any("5 layers" in m or "4 layers" in m for m in logs), logs


def test_auto_dropout_counts_the_expert_weights_peft_converts_linear_names_into():
    """PEFT's v4-to-v5 conversion turns a list naming gate_proj + up_proj into LoRA on the experts' gate_up_proj (LongCat-
    Flash, DeepSeek-V3, Qwen3-Next...): auto gave 0.05 there, and PEFT refused it with "ParamWrapper does not work with
    lora_dropout != 0", which the check blamed on lora.target_modules (a review). auto now gives 0 and says so; a number
    the user set is the lora.dropout line."""
    import torch
    from peft import get_peft_model

    from tasks.common import StageError
    from tasks.config import LoraSection
    from tasks.models import lora_config, lora_targets, peft_quietly

    lora = LoraSection(r=8, target_modules=["q_a_proj", "gate_proj", "up_proj"])
    t = lora_targets(_skeleton("longcat_flash"), lora)
    assert t.dropout == 0 and "LoRA dropout 0 (lora.dropout auto" in t.describe(), t.describe()
    with torch.device("meta"), peft_quietly(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        get_peft_model(_skeleton("longcat_flash"), lora_config(lora, t))  # PEFT takes it
    with pytest.raises(StageError, match=r"^lora\.dropout: 0\.05 cannot apply to the routed experts' weights \((experts\.)?gate_up_proj\)"):
        lora_targets(_skeleton("longcat_flash"), lora.model_copy(update={"dropout": 0.05}))
    assert lora_targets(_skeleton("llama"), LoraSection(target_modules=["gate_proj", "up_proj"])).dropout == 0.05  # no conversion there


@pytest.mark.parametrize("quant", [["quant.cpu_fallback=qlora", "quant.compute_dtype=bfloat16"], []], ids=["nf4", "lora"])
def test_random_weights_in_memory_build_the_model_the_folder_gives(quant, tmp_path):
    """model.random_weights=memory (bench/gpu_archs.py --in-memory: Qwen3-30B-A3B at 48 layers without its 61 GB folder):
    no weights written, and the model training gets is the folder's: the same module types by name (NF4 Linear4bit where
    the folder's has them: bitsandbytes quantizes on CPU with quant.cpu_fallback=qlora), the same trainable parameters,
    the same loss on the same batch with the same LoRA (the profile's: attention + the experts' target_parameters)."""
    import torch

    from tasks.config import load_config
    from tasks.engine.build import build_model
    from tasks.models import resolve_model

    def built(weights: str):
        cfg = load_config(profile="qwen3-moe-30b", overrides=[
            f"artifacts_dir={tmp_path}", "model.name=random:qwen3_moe", "device=cpu", f"model.random_weights={weights}",
            f"model.random_config={json.dumps({**ARCHS['qwen3_moe'][0], 'dtype': 'bfloat16'})}", *quant])
        ref = resolve_model(cfg.model, cfg.artifacts_dir)
        torch.manual_seed(0)
        model = build_model(ref, cfg.model, cfg.quant, cfg.lora, True, "cpu", "fused" if not quant else "padded")
        with torch.no_grad():  # LoRA-B off zero, so the loss goes through every adapter
            for i, (n, p) in enumerate(model.named_parameters()):
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
        x = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=x, labels=x).loss.item()
        return ref, {n: type(m).__name__ for n, m in model.named_modules()}, \
            {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}, loss

    (folder, *expected), (memory, *got) = built("folder"), built("memory")
    assert list(Path(folder.path).glob("*.safetensors")) and not list(Path(memory.path).glob("*.safetensors"))
    assert memory.random_in_memory and memory.path != folder.path and (Path(memory.path) / "tokenizer.json").is_file()
    types, trainable, loss = got
    assert types == expected[0] and ("Linear4bit" in types.values()) == bool(quant)
    assert trainable == expected[1] and any("experts" in n for n in trainable)
    assert loss == expected[2]


def test_random_weights_memory_is_for_random_models_only():
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.random_weights: memory builds random:<arch> models only.*'mistralai/Mistral-7B-v0.1'"):
        load_config(profile="mistral-7b", overrides=["model.random_weights=memory", "model.name=mistralai/Mistral-7B-v0.1"])


def test_a_run_with_random_weights_in_memory_publishes_nothing(tmp_path):
    """Its base folder holds config and tokenizer only: stage 7 would ship an adapter whose base cannot be loaded."""
    from tasks.common import StageError
    from tasks.config import load_config
    from tasks.publish import publish_artifacts

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path}", "model.random_weights=memory"])
    with pytest.raises(StageError, match="model.random_weights is memory.*set model.random_weights=folder"):
        publish_artifacts(cfg, "run", {})
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


@pytest.mark.parametrize("fallback", ["lora", "qlora"])
def test_gpt2s_conv1d_layers_are_linear_layers_all_linear_reaches_and_the_merge_folds(prefect_server, tmp_path, capfd, fallback):
    """GPT-2 keeps its linear layers as transformers' Conv1D (c_attn, c_proj, c_fc: the weight stored [in, out]), which
    PEFT's all-linear counts. A review (2026-12-04): all-linear stopped the run with "nothing to adapt in the decoder blocks
    of this model (linear layers: none); use all-linear"; counted as linear layers, the merge's delta check then took
    PEFT's transposed (fan_in_fan_out) delta for a shape error. The whole flow runs, every Conv1D merged, and PEFT's note
    that it turned fan_in_fan_out on is not repeated at each wrap. Under 4-bit (`qlora`: NF4 on the CPU as on a GPU)
    transformers quantizes each Conv1D into a Linear4bit, transposed: the merged [out, in] weights did not load into the
    plain GPT-2's [in, out] Conv1D ("size mismatch for transformer.h.0.attn.c_attn.weight"), found 2026-12-04 by
    bench/merge_check.py; they are transposed back, the square attn.c_proj too."""
    from flows.finetune import finetune

    cfg = {"n_embd": 64, "n_layer": 2, "n_head": 4, "initializer_range": 0.2}
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune(profile="tiny", overrides=[f"artifacts_dir={tmp_path / 'artifacts'}", "model.name=random:gpt2",
                                                     f"model.random_config={json.dumps(cfg)}", f"quant.cpu_fallback={fallback}"])
    assert result["status"] == "completed"
    targets = result["stages"]["train"]["outputs"]["lora_targets"]
    assert set(targets["modules"]) == {"c_attn", "c_proj", "c_fc"}, targets
    merge = result["stages"]["merge"]["outputs"]
    assert merge["check"]["passed"] and merge["merged_modules"] == 2 * 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]


@pytest.mark.parametrize("arch, name, says", [
    ("llama", "lm_head", "lm_head is outside the decoder blocks (lm_head), which LoRA here does not adapt"),
    ("gemma3", "out_proj", "out_proj is outside the decoder blocks (model.vision_tower."),
    ("mixtral", "gate", "gate is a MoE router, kept as pretrained so the experts' load stays balanced"),
    ("qwen2_moe", "shared_expert_gate", "shared_expert_gate is a MoE router"),
    ("qwen2_moe", "shared_expert", "shared_expert is no linear layer (model.layers.0.mlp.shared_expert); name its linear layers instead: "
                                   "gate_proj, up_proj, down_proj"),
    ("llama", "self_attn.q_proj", "self_attn.q_proj: name a layer by its last name (q_proj)"),
    ("llama", "q_prj", "q_prj not in this model"),
    # the transformers-4 names of Unsloth's and LLaMA-Factory's MoE recipes
    ("qwen3_moe", "gate_proj", "gate_proj: this model keeps its experts' gate projections fused in experts.gate_up_proj (transformers 5)"),
])
def test_a_target_name_the_model_has_but_lora_does_not_adapt_says_what_it_is(arch, name, says):
    """A name that picks nothing was always "<name> not in this model", also for the LM head, a router or the vision tower's
    layers, which are in the model (a review, 2026-12-04): the line says what the name is, then the names that work."""
    from tasks.common import StageError
    from tasks.config import LoraSection
    from tasks.models import lora_targets

    with pytest.raises(StageError) as e:
        lora_targets(_skeleton(arch), LoraSection(target_modules=["q_proj", name], dropout=0.0))
    msg = str(e.value)
    assert msg.startswith(f"lora.target_modules: {says}") and "its linear layers are: q_proj" in msg and "\n" not in msg, msg


def test_a_model_whose_lm_head_is_called_decoder_still_finds_its_blocks():
    """ModernBERT-decoder (the Ettin decoders) names its LM head `decoder`, which `get_decoder()` returns: the decoder blocks
    were looked for inside that Linear, and all-linear stopped with "nothing to adapt ... (linear layers: none); use
    all-linear" (a review, 2026-12-04)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.config import LoraSection
    from tasks.models import decoder_blocks, lora_targets

    config = AutoConfig.for_model("modernbert-decoder", vocab_size=512, pad_token_id=0, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert decoder_blocks(model) == ("model.layers", 2)
    t = lora_targets(model, LoraSection())
    assert set(t.modules) == {"q_proj", "k_proj", "v_proj", "Wo", "Wi"}, t.describe()


def test_the_decoder_blocks_are_the_outermost_list_not_a_longer_one_inside_a_block():
    """LongCat-Flash's blocks each hold two attentions and two MLPs in ModuleLists: at one layer the longest list was a
    block's `self_attn` (2), so recompute and the layer count worked on attention modules; GIT's longest list is its
    vision encoder's (12 layers), not its 2 text layers (a review of issue 20, 2026-12-04)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.models import decoder_blocks

    config = AutoConfig.for_model("longcat_flash", num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert decoder_blocks(model) == ("model.layers", 1)

    config = AutoConfig.for_model("git", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert decoder_blocks(model) == ("git.encoder.layer", 2)


def test_remote_code_models_that_carry_state_along_a_row_are_named_too():
    """trust_remote_code configs of linear-attention/RNN models name no layer_types (MiniMax-Text-01's attn_type_list,
    0 = a lightning-attention layer; Kimi-Linear's linear_attn_config; RWKV-6/7 and flash-linear-attention's models by
    their model_type; Nemotron-H's hybrid_override_pattern): they were called attention-only, so engine auto packed
    their rows on CUDA. Attention-only remote configs (and MiniMax with softmax layers only) stay None."""
    from transformers import PretrainedConfig

    from tasks.models import recurrent_layers_of

    def config(model_type, **kw):
        return type("RemoteConfig", (PretrainedConfig,), {"model_type": model_type})(**kw)

    for c in (config("minimax_text_01", attn_type_list=[0] * 7 + [1]), config("rwkv7", attn_mode="chunk"), config("rwkv6"),
              config("kimi_linear", linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4]}),
              config("gated_deltanet"), config("gla"), config("retnet"), config("hgrn2"),
              config("nemotron_h_remote", hybrid_override_pattern="M-M-M*-M")):
        assert recurrent_layers_of(c), c.model_type
    for c in (config("my_llama", hidden_size=64), config("minimax_text_01", attn_type_list=[1, 1])):
        assert recurrent_layers_of(c) is None, c.model_type


def test_a_probe_cached_before_auto_trained_state_carrying_models_padded_is_not_reused(shared_artifacts, monkeypatch):
    """engine auto on CUDA was fused for a Jamba until it learnt to train such models padded; the probe's key did not
    change with that, so a probe measured on packed rows (and stage 4's adapter, keyed by the probe's key, trained on
    them) came back from the cache, and stage 4 trained padded under the fused probe's micro-batch and accumulation.
    Now such a model's probe key is its own; an attention-only model's, any explicit engine's and the CPU's are as they were."""
    import tasks.probe as probe
    from tasks.config import load_config

    monkeypatch.setattr(probe, "cache_key", lambda *a: "key")
    for arch, device, engine, same in (("jamba", "cuda", "auto", False), ("jamba", "cpu", "auto", True),
                                       ("jamba", "cuda", "padded", True), ("llama", "cuda", "auto", True)):
        monkeypatch.setattr(probe, "resolve_device", lambda d, device=device: device)
        cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", f"model.name=random:{arch}",
                                                     *([f"model.random_config={json.dumps(SSM_ARCHS['jamba'])}"] if arch == "jamba" else []),
                                                     f"training.engine={engine}"])
        key = probe.probe_key(None, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, device, shared_artifacts)
        assert (key == "key") == same, (arch, device, engine)


def test_an_adapter_trained_before_a_fix_to_its_models_packed_training_is_not_reused(shared_artifacts, monkeypatch):
    """A review: a llama4_text adapter trained on the fast engine at b21e026^ (its chunked attention crossed chunks on packed
    rows: logits off by up to 0.49) came back Cached at HEAD, with its evaluation and merge: the keys cannot see the fix.
    Such a kind's probe key on the packed engines is its own now (PACKED_ENGINE_FIXES; stage 4's key holds it); the padded
    engine's, other models' and engine auto on the CPU (padded) keep theirs."""
    import tasks.probe as probe
    from tasks.config import load_config

    monkeypatch.setattr(probe, "cache_key", lambda *a: "key")
    for arch, device, engine, same in (("llama4_text", "cpu", "fast", False), ("gpt_oss", "cuda", "auto", False),
                                       ("gpt_oss", "cpu", "fast", False), ("gpt_oss", "cpu", "auto", True),
                                       ("llama4_text", "cuda", "padded", True), ("llama", "cuda", "auto", True), ("llama", "cpu", "fast", True)):
        monkeypatch.setattr(probe, "resolve_device", lambda d, device=device: device)
        cfg = load_config(profile="tiny", overrides=[*_flow_args(shared_artifacts, arch), f"training.engine={engine}", "lora.dropout=auto"])
        key = probe.probe_key(None, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, device, shared_artifacts)
        assert (key == "key") == same, (arch, device, engine)
