"""Survey: every random:<moe-arch> through check_model (lora.dropout auto, default targets). argv[1]: repo root; argv[2]: out json."""
import sys, json, copy, warnings, traceback, time
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
from transformers.utils import logging; logging.set_verbosity_error()
from transformers import CONFIG_MAPPING
from tasks.config import load_config
from tasks.preflight import check_model, _check_peft_accepts
from tasks.models import lora_targets

ARCHS = sys.argv[3].split(",")
SHRINK = dict(hidden_size=64, d_model=64, intermediate_size=128, ffn_hidden_size=64, num_hidden_layers=2, num_layers=2, n_layers=2,
              num_attention_heads=4, n_heads=4, num_key_value_heads=2, head_dim=16, kv_channels=16, moe_intermediate_size=32,
              shared_expert_intermediate_size=64, expert_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
              moe_num_experts=4, num_experts_per_tok=2, moe_topk=2, moe_top_k=2, top_k=2, n_group=1, topk_group=1, kv_lora_rank=16,
              q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=256, n_shared_experts=1,
              num_shared_experts=1, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
              mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_head_dim=16, ssm_state_size=8, n_groups=1, mamba_num_heads=4,
              moe_shared_expert_intermediate_size=64, global_num_experts=4)

sys.path.insert(0, sys.argv[1] + "/tests")
from test_architectures import MORE_MOE
EXTRA = {"dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1},
         "dots3_note_text": {"num_key_value_heads": 4}, "dots3_note": {"num_key_value_heads": 4}, "zaya": {"num_experts_per_tok": 1},
         "doge": {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 2}, "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
         "flint": {"mlp_only_layers": [0]}, "hunyuan_v1_moe": {"rope_theta": 10000.0, "head_dim": 16},
         "deepseek_v4": {"mlp_layer_types": ["moe", "moe"]}, "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1},
         "granitemoehybrid": {"mamba_d_head": 32}, "inkling2_text": {"unpadded_vocab_size": 512}, "inkling2_loop_text": {"unpadded_vocab_size": 512},
         "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 64, "indexer_compress_ratio": 4},
         "gemma4_text": {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}}

def tiny(arch):
    if arch in MORE_MOE:
        return copy.deepcopy(MORE_MOE[arch])
    cls = CONFIG_MAPPING[arch]
    d = cls()
    sub = getattr(d, "text_config", None)
    def shrink(c):
        v = vars(c)
        out = {k: s for k, s in SHRINK.items() if isinstance(v.get(k), int) and not isinstance(v.get(k), bool) and v.get(k) > 0}
        if isinstance(v.get("first_k_dense_replace"), int):
            out["first_k_dense_replace"] = 1  # one dense block, one MoE block
        if isinstance(v.get("mlp_layer_types"), list):
            out["mlp_layer_types"] = ["dense", "sparse"] if "dense" in v["mlp_layer_types"] else ["sparse", "sparse"]
        if isinstance(v.get("layer_types"), list) and v["layer_types"]:
            out["layer_types"] = [v["layer_types"][0], v["layer_types"][-1]]
        if isinstance(v.get("mlp_only_layers"), list) and v["mlp_only_layers"]:
            out["mlp_only_layers"] = [0]
        out.update({k: x for k, x in EXTRA.get(arch, {}).items()})
        return out
    if sub is not None and hasattr(sub, "hidden_size"):
        out = {"text_config": shrink(sub)}
        vc = getattr(d, "vision_config", None)
        if vc is not None:
            out["vision_config"] = {k: s for k, s in dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, depth=1,
                                                                 num_heads=2, embed_dim=32, out_hidden_size=64).items() if isinstance(vars(vc).get(k), int)}
        return out
    return shrink(d)

rows = {}
for arch in ARCHS:
    t0 = time.time()
    row = {}
    try:
        rc = tiny(arch)
        row["random_config"] = rc
        cfg = load_config(profile="tiny", overrides=[f"artifacts_dir=/tmp/moenames/art", f"model.name=random:{arch}",
                                                     f"model.random_config={json.dumps(rc)}", "lora.dropout=auto"])
        lines = check_model(cfg.model, cfg.lora, cfg.quant, "cpu", cfg.artifacts_dir)
        row["check_model"] = lines
    except BaseException as e:
        row["check_model_error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        # the same model line from the default-size config's skeleton on the meta device (no weights)
        try:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM
            from tasks.config import LoraSection
            with torch.device("meta"):
                sk = AutoModelForCausalLM.from_config(CONFIG_MAPPING[arch]())
            lora = LoraSection()
            t = lora_targets(sk, lora)
            row["skeleton"] = "model: " + _check_peft_accepts(sk, lora, t).describe()
        except BaseException as e2:
            row["skeleton_error"] = f"{type(e2).__name__}: {str(e2)[:800]}"
    row["s"] = round(time.time() - t0, 1)
    rows[arch] = row
    print(arch, json.dumps(row)[:600], flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
