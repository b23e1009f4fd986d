"""Contracts of tasks/engine/fastpath.py and tasks/engine/recompute.py on a tiny random Mistral (2 layers, 64 wide), CPU only.

The padding-free collator restarts positions and masks each sample's first label; a packed forward gives every
sample the same logits, loss and gradients as running it alone (no cross-sample attention), with transformers'
sdpa masks and with the project's varlen attention; pack_by_tokens respects its budget and places every index
exactly once. Tolerance: fp32 on CPU, so packed and separate runs agree to 1e-5 absolute on logits and 1e-6
relative on the loss; only summation order differs between them.
"""

import pytest
import torch

from tasks.engine import fastpath
from tasks.engine.fastpath import (
    IGNORE_INDEX,
    PackedDataset,
    PaddingFreeCollator,
    fast_attn_implementation,
    pack_by_tokens,
    packed_hf_dataset,
    prepare_fast_model,
    register_varlen_attention,
    rows_fit_window,
)
from tasks.engine.recompute import checkpointed_layers, recompute_free_layers, set_recompute_free_layers

transformers = pytest.importorskip("transformers")

LOGITS_ATOL = 1e-5
LOSS_RTOL = 1e-6


def tiny_model(attn: str):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, attn_implementation=attn,
    )
    return MistralForCausalLM(config).eval()


def samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX if j < n // 3 else t for j, t in enumerate(ids)]  # a masked "prompt" prefix
        out.append({"input_ids": ids, "labels": labels})
    return out


def assert_packed_matches_alone(packed: torch.Tensor, feats: list[dict], model) -> None:
    """Each sample's rows of a packed row's logits (T, V) equal `model` run on that sample alone."""
    start = 0
    for f in feats:
        n = len(f["input_ids"])
        alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        torch.testing.assert_close(packed[start : start + n], alone, atol=LOGITS_ATOL, rtol=0)
        start += n


def assert_batch_forms_match(varlen, eager, packed: list[dict], padded: torch.Tensor, rows: list[dict] | None = None) -> None:
    """`varlen` gives `eager`'s logits (same weights) on each batch form: `packed` samples on one packed row (each
    sample as if run alone), `rows` (n samples of one length, if given) as full packs of n plain rows, and `padded`
    (token 0 is padding) with its attention mask, compared on the real tokens."""
    with torch.no_grad():
        assert_packed_matches_alone(varlen(**PaddingFreeCollator()(packed)).logits[0], packed, eager)
        if rows is not None:
            batch = PaddingFreeCollator(full_rows=(len(rows), len(rows[0]["input_ids"])))(rows)
            assert batch["input_ids"].shape == (len(rows), len(rows[0]["input_ids"]))
            torch.testing.assert_close(varlen(**batch).logits, eager(input_ids=batch["input_ids"]).logits, atol=LOGITS_ATOL, rtol=0)
        mask = (padded != 0).long()
        torch.testing.assert_close(varlen(input_ids=padded, attention_mask=mask).logits[mask.bool()],
                                   eager(input_ids=padded, attention_mask=mask).logits[mask.bool()], atol=LOGITS_ATOL, rtol=0)


def test_collator_positions_labels_and_boundaries():
    feats = samples([5, 3, 7])
    batch = PaddingFreeCollator()(feats)
    assert batch["input_ids"].shape == (1, 15)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 15] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 7
    assert batch["use_cache"] is False  # a KV cache would disable transformers' packed-sequence masks
    labels = batch["labels"][0].tolist()
    for start, f in zip([0, 5, 8], feats):
        n = len(f["input_ids"])
        assert labels[start] == IGNORE_INDEX
        assert labels[start + 1 : start + n] == f["labels"][1:]  # the data stage's masking is kept
    assert batch["input_ids"][0].tolist() == sum((f["input_ids"] for f in feats), [])


def test_collator_accepts_packs_counts_tokens_and_rejects_bad_rows():
    rows = samples([4, 6, 2])
    collator = PaddingFreeCollator()
    ds = PackedDataset(rows, [[0, 2], [1]])
    batch = collator([ds[0]])  # DataLoader with batch_size=1 hands a list holding one pack
    assert batch["input_ids"].shape == (1, 6) and collator.tokens_seen == 6
    no_labels = collator([{"input_ids": [5, 6, 7]}])
    assert no_labels["labels"][0].tolist() == [IGNORE_INDEX, 6, 7]
    with pytest.raises(ValueError, match="labels"):
        collator([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="max_tokens"):
        PaddingFreeCollator(max_tokens=5)(rows[:2])


def test_collator_accepts_rows_of_a_packed_hf_dataset():
    pytest.importorskip("datasets")
    rows = samples([4, 6, 2])
    ds = packed_hf_dataset(rows, [[0, 2], [1]])
    assert len(ds) == 2
    a, b = PaddingFreeCollator()([ds[0]]), PaddingFreeCollator()(PackedDataset(rows, [[0, 2]])[0])
    for k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_packed_forward_matches_separate_samples(attn):
    attn = register_varlen_attention() if attn == "varlen" else attn
    model = tiny_model(attn)
    feats = samples([9, 4, 17, 1, 12], seed=1)
    batch = PaddingFreeCollator()(feats)
    with torch.no_grad():
        assert_packed_matches_alone(model(**batch).logits[0], feats, model)


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_packed_loss_and_gradients_match_separate_samples(attn):
    """Same token-weighted loss and the same gradients as the samples run one by one."""
    attn = register_varlen_attention() if attn == "varlen" else attn
    model = tiny_model(attn).train()
    feats = samples([11, 6, 20], seed=2)
    batch = PaddingFreeCollator()(feats)
    n_items = int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())

    model.zero_grad()
    packed_loss = model(**batch, num_items_in_batch=n_items).loss
    packed_loss.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad()
    total = 0.0
    for f in feats:
        out = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]), num_items_in_batch=n_items)
        out.loss.backward()
        total += out.loss.item()
    assert packed_loss.item() == pytest.approx(total, rel=LOSS_RTOL)
    for k, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[k], p.grad, atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
@pytest.mark.parametrize("keep", [False, True])
def test_full_packs_go_as_rows_with_the_packed_rows_loss_and_gradients(attn, keep):
    """full_rows=(n, length): n samples of `length` tokens each go as an (n, length) batch of plain causal rows (no
    positions, no cu_seq_lens); loss, head positions' targets and every gradient equal the packed row's. With
    keep_logits the head runs on the positions any row trains on (rows masked differently: the union), each row's
    others labelled -100. Any other pack stays one packed row."""
    attn = register_varlen_attention() if attn == "varlen" else attn
    model = tiny_model(attn).train()
    feats = samples([16, 16, 16], seed=4)
    feats[1]["labels"] = [IGNORE_INDEX] * 12 + feats[1]["labels"][12:]  # another prompt length: the kept positions differ
    results = []
    for rows in (None, (3, 16)):
        batch = PaddingFreeCollator(keep_logits=keep, full_rows=rows)(feats)
        assert ("position_ids" in batch) == (rows is None) and batch["input_ids"].shape == ((3, 16) if rows else (1, 48))
        n_items = int((batch.get("shift_labels", batch["labels"][..., 1:]) != IGNORE_INDEX).sum())  # Trainer's count
        model.zero_grad()
        out = model(**batch, num_items_in_batch=n_items)
        out.loss.backward()
        results.append((out.loss.item(), n_items, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (packed_loss, packed_n, packed_grads), (rows_loss, rows_n, rows_grads) = results
    assert rows_n == packed_n == sum(sum(y != IGNORE_INDEX for y in f["labels"][1:]) for f in feats)
    assert rows_loss == pytest.approx(packed_loss, rel=LOSS_RTOL)
    for k, g in packed_grads.items():
        torch.testing.assert_close(rows_grads[k], g, atol=1e-6, rtol=1e-4, msg=k)
    if keep:
        batch = PaddingFreeCollator(keep_logits=True, full_rows=(3, 16))(feats)
        assert batch["logits_to_keep"].tolist() == list(range(16 // 3 - 1, 15))  # the union: rows 0 and 2 train from 5 on
        assert (batch["shift_labels"][1, : 12 - 16 // 3] == IGNORE_INDEX).all()  # row 1 trains from 12 on
    for other in (samples([16, 16], seed=5), samples([16, 16, 15], seed=5), samples([16, 16, 16, 16], seed=5)):
        assert "cu_seq_lens_q" in PaddingFreeCollator(full_rows=(3, 16))(other)  # not exactly 3 samples of 16: packed


def test_collator_for_sends_full_packs_as_rows_only_where_the_window_holds_a_row():
    """collator_for's rows need the model and the run's (micro_batch, max_length), and a model whose sliding window,
    if any, holds a whole row: a shorter window would need a mask (Gemma-3's 512-token local layers stay packed)."""
    from tasks.engine.collate import collator_for

    model = tiny_model("sdpa")
    assert collator_for("fused", 0, model, (3, 16)).full_rows == (3, 16)
    assert collator_for("fast", 0, model, (3, 16)).full_rows == (3, 16)
    assert collator_for("fused", 0, model).full_rows is None and collator_for("fused", 0, None, (3, 16)).full_rows is None
    for window, rows in ((8, None), (16, (3, 16)), (4096, (3, 16))):
        model.config.sliding_window = window
        assert collator_for("fused", 0, model, (3, 16)).full_rows == rows, window
    gemma = tiny_gemma3("sdpa")
    assert collator_for("fused", 0, gemma, (2, gemma.config.sliding_window + 1)).full_rows is None
    assert not hasattr(collator_for("padded", 0, model, (3, 16)), "full_rows")


def test_varlen_attention_keeps_padded_batches_on_sdpa():
    """A padded batch (2D attention mask) gives the same logits under the varlen name as under sdpa."""
    varlen, sdpa = tiny_model(register_varlen_attention()), tiny_model("sdpa")
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        a = varlen(input_ids=ids, attention_mask=mask).logits
        b = sdpa(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=LOGITS_ATOL, rtol=0)


def test_varlen_attention_finds_boundaries_from_positions_alone():
    """Without cu_seq_lens (another collator), restarting position_ids still keep samples apart."""
    model = tiny_model(register_varlen_attention())
    batch = PaddingFreeCollator()(samples([5, 8]))
    with torch.no_grad():
        full = model(**batch).logits
        positions_only = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(full, positions_only, atol=LOGITS_ATOL, rtol=0)


def test_pack_by_tokens_respects_budget_and_covers_every_index_once():
    g = torch.Generator().manual_seed(3)
    lengths = [int(x) for x in torch.randint(1, 2049, (500,), generator=g)]
    packs = pack_by_tokens(lengths, max_tokens=8192, seed=7)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 8192 for p in packs)
    lower_bound = -(-sum(lengths) // 8192)
    assert len(packs) <= lower_bound + 2  # best-fit decreasing wastes little
    assert pack_by_tokens(lengths, 8192, seed=7) == packs  # deterministic for a seed
    assert pack_by_tokens(lengths, 8192, seed=8) != packs


def test_pack_by_tokens_full_length_and_errors():
    packs = pack_by_tokens([2048] * 12, max_tokens=4 * 2048, seed=0)
    assert sorted(len(p) for p in packs) == [4, 4, 4]
    assert pack_by_tokens([], 10, seed=0) == []
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        pack_by_tokens([3, 11], max_tokens=10, seed=0)
    with pytest.raises(ValueError, match="positive"):
        pack_by_tokens([3], max_tokens=0, seed=0)


def test_fast_attn_implementation_and_cpu_degradation():
    assert fast_attn_implementation("cpu") == "sdpa"
    assert fast_attn_implementation("cuda") == fastpath.VARLEN_ATTENTION
    model = tiny_model("sdpa")
    forward = model.forward
    assert prepare_fast_model(model) is model  # CPU: liger is never applied
    assert model.forward == forward
    assert prepare_fast_model(model, use_liger=False) is model


def test_recompute_free_layers_budget_arithmetic():
    assert recompute_free_layers(peak_full_gb=8.0, per_layer_gb=1.0, budget_gb=16.0, n_layers=32) == 7
    assert recompute_free_layers(peak_full_gb=8.0, per_layer_gb=1.0, budget_gb=8.0, n_layers=32) == 0
    assert recompute_free_layers(peak_full_gb=8.0, per_layer_gb=0.1, budget_gb=80.0, n_layers=32) == 32


def test_set_recompute_free_layers_toggles_the_last_layers():
    model = tiny_model("sdpa").train()
    model.gradient_checkpointing_enable()
    assert set_recompute_free_layers(model, 1) == 1
    flags = [layer.gradient_checkpointing for layer in checkpointed_layers(model)]
    assert flags == [True, False]
    assert set_recompute_free_layers(model, 99) == 2


def tiny_gemma3(attn: str, sliding_window: int = 6):
    """Gemma-3's text model: local layers see a window of `sliding_window` tokens, every 2nd layer is global."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=256, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"] * 2, attn_implementation=attn,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("train", [False, True])
def test_varlen_packed_rows_keep_sliding_windows_and_samples_apart(train):
    """Gemma-3 on the varlen attention: samples longer than the local layers' window, packed, get the logits they get
    alone under sdpa (which applies the window). The old code sent such a pack to a mask-less sdpa call, attending
    across samples and past the window (an H200 run of Gemma-3-270M started at loss 7.2 instead of 2.6)."""
    varlen, sdpa = tiny_gemma3(register_varlen_attention()), tiny_gemma3("sdpa")
    varlen.train(train)  # training mode: attention dropout is 0 in the config, the path is the same
    feats = samples([9, 4, 17, 1, 12], seed=4)
    batch = PaddingFreeCollator()(feats)
    with torch.no_grad():
        assert_packed_matches_alone(varlen(**batch).logits[0], feats, sdpa)
        # one sequence longer than the window, no mask and no boundaries: still windowed
        ids = torch.tensor([feats[2]["input_ids"]])
        torch.testing.assert_close(varlen(input_ids=ids, use_cache=False).logits, sdpa(input_ids=ids).logits, atol=LOGITS_ATOL, rtol=0)
        # an unpadded batch of two such rows
        two = torch.stack([ids[0], ids[0].flip(0)])
        torch.testing.assert_close(varlen(input_ids=two, use_cache=False).logits, sdpa(input_ids=two).logits, atol=LOGITS_ATOL, rtol=0)


def test_varlen_attention_with_a_kv_cache_matches_sdpa():
    """Generation through the varlen name (review of issue 18's window fix): a static cache's unfilled slots and tokens
    fed after a cached prefix, with no attention mask, need transformers' mask — the varlen path asks for it there."""
    from transformers import DynamicCache

    varlen, sdpa = tiny_gemma3(register_varlen_attention()), tiny_gemma3("sdpa")
    ids = torch.tensor([samples([14], seed=5)[0]["input_ids"]])
    with torch.no_grad():
        for cache in ("static", None):
            a = varlen.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation=cache)
            b = sdpa.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation=cache)
            assert torch.equal(a, b), cache
        outs = []
        for model in (varlen, sdpa):
            past = DynamicCache(config=model.config)
            model(input_ids=ids[:, :10], past_key_values=past, use_cache=True)
            outs.append(model(input_ids=ids[:, 10:], past_key_values=past, use_cache=True).logits)
        torch.testing.assert_close(outs[0], outs[1], atol=LOGITS_ATOL, rtol=0)


def test_varlen_attention_keeps_samples_apart_in_unusual_rows():
    """Rows of another collator: several rows packed by restarting positions, and a row whose first sample does not
    start at position 0 (a continued document) — each sample still attends only to itself and its window."""
    varlen, sdpa = tiny_gemma3(register_varlen_attention()), tiny_gemma3("sdpa")
    a, b, c = (torch.tensor(f["input_ids"]) for f in samples([9, 11, 20], seed=6))
    with torch.no_grad():
        alone = {k: sdpa(input_ids=x[None]).logits[0] for k, x in (("a", a), ("b", b), ("c", c))}
        rows = torch.stack([torch.cat([a, b]), c])
        pos = torch.stack([torch.cat([torch.arange(9), torch.arange(11)]), torch.arange(20)])
        out = varlen(input_ids=rows, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(out[0, :9], alone["a"], atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(out[0, 9:], alone["b"], atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(out[1], alone["c"], atol=LOGITS_ATOL, rtol=0)
        # a row that opens mid-document (positions 5, 6, ...) then packs a fresh sample
        pos = torch.cat([torch.arange(5, 14), torch.arange(11)])[None]
        out = varlen(input_ids=torch.cat([a, b])[None], position_ids=pos, use_cache=False).logits[0]
        first = sdpa(input_ids=a[None], position_ids=torch.arange(5, 14)[None]).logits[0]
        torch.testing.assert_close(out[:9], first, atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(out[9:], alone["b"], atol=LOGITS_ATOL, rtol=0)


def tiny_gpt_oss(attn: str, sliding_window: int = 6):
    """GPT-OSS: attention sinks (a learned logit per head), sliding and full layers alternating, experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                  num_experts_per_tok=2, sliding_window=sliding_window, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:  # sinks far from 0, so dropping them shows (random init leaves them ~0.02)
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
    return model


def test_attention_sinks_are_kept_in_every_batch_form_of_the_varlen_attention():
    """GPT-OSS's sinks (`s_aux`) reach the varlen attention as a keyword that flash varlen and sdpa have no place for:
    it dropped them (logits off by up to 5.7 on this model). Now every form computes them as transformers' eager
    attention does: a packed row (each sample as if alone), full packs as rows, a padded batch and greedy decoding with
    a KV cache give the eager model's logits and tokens; the sinks get a gradient."""
    varlen, eager = tiny_gpt_oss(register_varlen_attention()), tiny_gpt_oss("eager")
    eager.load_state_dict(varlen.state_dict())
    feats = samples([9, 4, 17, 12], seed=11)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 13, 14, 15, 16, 17]])  # left-padded, as generation pads
    assert_batch_forms_match(varlen, eager, feats, ids, rows=samples([10, 10, 10], seed=12))
    with torch.no_grad():
        mask = (ids != 0).long()
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(varlen.generate(input_ids=ids, attention_mask=mask, **kw), eager.generate(input_ids=ids, attention_mask=mask, **kw))
    varlen.train()
    varlen(**PaddingFreeCollator()(feats)).loss.backward()
    assert all(layer.self_attn.sinks.grad.abs().sum() > 0 for layer in varlen.model.layers)


def tiny_llama4(attn: str, chunk: int = 4, **extra):
    """Llama-4's text model: chunked attention on its RoPE layers (each token sees its own `chunk`-token chunk), full
    causal attention on every fourth (no RoPE, queries scaled by position), experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama4_text", vocab_size=128, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_local_experts=2, attention_chunk_size=chunk, pad_token_id=0, **extra)
    assert config.layer_types.count("chunked_attention") == 3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()


def test_llama4s_chunked_attention_is_kept_on_packed_rows_and_plain_rows():
    """Llama-4's chunked layers reach the varlen attention with no mask on a packed row or plain rows: it attended
    across chunks (logits off by up to 0.49 on this model, samples longer than the 4-token chunk). Now each chunk of a
    sample is a sample of its own on a packed row (for the flash varlen kernel too) and rows get the chunk mask; padded
    batches keep transformers' own mask. Full packs longer than a chunk stay one packed row. (Llama-4's layers pass
    the attention no position ids: chunks count from each sample's start, where the collator's positions start.)"""
    varlen, eager = tiny_llama4(register_varlen_attention()), tiny_llama4("eager")
    eager.load_state_dict(varlen.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 13, 14, 15, 16, 17]])  # left-padded, as generation pads
    assert_batch_forms_match(varlen, eager, samples([9, 4, 17, 12], seed=11), ids, rows=samples([10, 10, 10], seed=12))
    assert rows_fit_window(varlen, 4) and not rows_fit_window(varlen, 5)


def test_llama4s_position_scaled_queries_count_each_packed_sample_from_its_start():
    """Llama-4's no-RoPE layers scale queries by position (`attn_temperature_tuning`), counted along the row by
    transformers: on a packed row longer than floor_scale (8,192 on Llama-4, here 8) a sample past it was scaled as if
    it sat that far into one sequence (logits off by up to 3e-4 on this model). Now each sample's queries are scaled by
    its own positions, as when it runs alone; a padded batch keeps transformers' own scaling."""
    tuned = dict(floor_scale=8, attn_scale=1.0)
    varlen, eager = tiny_llama4(register_varlen_attention(), **tuned), tiny_llama4("eager", **tuned)
    eager.load_state_dict(varlen.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [0, 0, 0, 13, 14, 15, 16, 17, 18, 19]])
    assert_batch_forms_match(varlen, eager, samples([9, 4, 17, 12], seed=11), ids)


def test_softcapped_attention_trains_on_eager_not_varlen():
    """Gemma-2 caps attention logits; the varlen kernel cannot, so build_model loads it with eager attention (and the
    varlen function refuses a softcap rather than dropping it)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0, attn_implementation=register_varlen_attention())
    model = Gemma2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="softcapping"):
        model(**PaddingFreeCollator()(samples([5, 7])))


def test_varlen_attention_refuses_per_token_sinks_and_a_position_bias_rather_than_dropping_them():
    """A model whose class has no sdpa loads with the varlen attention on the packed engines (GPT-OSS: its `s_aux`
    sinks are computed). Inkling2 has no sdpa either, for its per-token `sinks` and its relative `position_bias`,
    which the varlen attention dropped without a word (logits off by 0.05 on one sample alone): it refuses them now,
    as it refuses a softcap, instead of training a different attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("inkling2_text", vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register_varlen_attention()).float().eval()
    with pytest.raises(ValueError, match="sinks"):
        model(input_ids=torch.tensor([samples([9])[0]["input_ids"]]), use_cache=False)


def test_build_model_loads_a_softcapped_model_with_eager_attention(shared_artifacts):
    import json

    from tasks.config import load_config
    from tasks.engine.build import build_model
    from tasks.models import resolve_model

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "attn_logit_softcapping": 50.0}
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "model.name=random:gemma2",
                                                 f"model.random_config={json.dumps(small)}", "device=cpu"])
    ref = resolve_model(cfg.model, shared_artifacts)
    model = build_model(ref, cfg.model, cfg.quant, cfg.lora, False, "cpu", "fast")
    assert model.config._attn_implementation == "eager"
    feats = samples([5, 7, 4], seed=7)
    with torch.no_grad():
        # packed samples still attend only to themselves (transformers' masks from the positions)
        assert_packed_matches_alone(model.eval()(**PaddingFreeCollator()(feats)).logits[0], feats, model)


@pytest.mark.parametrize("engine", ["fast", "fused"])
def test_gpt_oss_loads_with_the_varlen_attention_on_the_packed_engines_off_cuda(engine, shared_artifacts):
    """Off CUDA the packed engines load models with sdpa, which transformers refuses for GPT-OSS (its sinks): an explicit
    training.engine fast or fused failed in stage 3 with transformers' error. Such a model now loads with the registered
    varlen attention, which computes the sinks; packed samples see only themselves."""
    import json

    from tasks.config import load_config
    from tasks.engine.build import build_model
    from tasks.models import resolve_model

    small = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2}
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "model.name=random:gpt_oss",
                                                 f"model.random_config={json.dumps(small)}", "device=cpu"])
    ref = resolve_model(cfg.model, shared_artifacts)
    model = build_model(ref, cfg.model, cfg.quant, cfg.lora, False, "cpu", engine)
    assert model.config._attn_implementation == register_varlen_attention()
    feats = samples([5, 7, 4], seed=7)
    with torch.no_grad():
        assert_packed_matches_alone(model.eval()(**PaddingFreeCollator()(feats)).logits[0], feats, model)


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_lm_head_on_trained_positions_only_gives_the_same_loss_and_gradients(arch):
    """keep_logits: the LM head and the loss run only where the next token is a label; loss and every gradient equal
    the full-logits computation's (prompt positions contribute nothing to either)."""
    from tasks.engine.fastpath import accepts_logits_to_keep

    model = (tiny_model("sdpa") if arch == "mistral" else tiny_gemma3("sdpa")).train()
    assert accepts_logits_to_keep(model)
    feats = samples([11, 6, 20, 3], seed=8)
    results = []
    for keep in (False, True):
        batch = PaddingFreeCollator(keep_logits=keep)(feats)
        n_items = int((batch.get("shift_labels", batch["labels"][:, 1:]) != IGNORE_INDEX).sum())
        model.zero_grad()
        out = model(**batch, num_items_in_batch=n_items)
        out.loss.backward()
        results.append((out.loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}, out.logits.shape[1], n_items))
    (full_loss, full_grads, full_positions, n_full), (kept_loss, kept_grads, kept_positions, n_kept) = results
    assert n_full == n_kept and kept_positions == n_kept < full_positions  # only trained positions went through the head
    assert kept_loss == pytest.approx(full_loss, rel=1e-6)
    for k, g in full_grads.items():
        torch.testing.assert_close(kept_grads[k], g, atol=1e-6, rtol=1e-4, msg=k)


def test_kernel_patches_end_with_the_scope_so_a_later_model_decodes_as_loaded(tmp_path):
    """Liger patches transformers module-wide (classes, `apply_rotary_pos_emb`); its RoPE (0.8.5) rotated the wrong rows
    when a batch decoded one token after Gemma-3's q/k norms, so stage 5 after stage 4 in one process answered garbage on
    the GPU. A stand-in with the same module-wide reach, and a RoPE that is wrong on one-token steps, must not reach a
    model loaded after the stage's scope; the model patched inside keeps its patched modules."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.models.gemma3 import modeling_gemma3 as g3

    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                           pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()

    def answers() -> list[list[int]]:
        model = Gemma3ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, ids.shape[1]:].tolist()

    class PatchedNorm(g3.Gemma3RMSNorm):
        pass

    true_rope, true_forward = g3.apply_rotary_pos_emb, g3.Gemma3ForCausalLM.forward

    def rope_wrong_on_one_token(q, k, cos, sin, *args, **kwargs):
        q, k = true_rope(q, k, cos, sin, *args, **kwargs)
        return (q.flip(0), k.flip(0)) if q.shape[2] == 1 else (q, k)

    def like_liger(model):
        g3.apply_rotary_pos_emb = rope_wrong_on_one_token
        g3.Gemma3RMSNorm = PatchedNorm
        g3.Gemma3ForCausalLM.forward = lambda self, *a, **kw: true_forward(self, *a, **kw)
        model.model.norm.__class__ = PatchedNorm

    before = answers()
    with fastpath.kernel_patch_scope():
        patched = Gemma3ForCausalLM.from_pretrained(tmp_path)
        fastpath.apply_kernel_patches(like_liger, model=patched)
        assert answers() != before  # what a leaked patch does to a model loaded later (the old stage 5)
    assert (g3.apply_rotary_pos_emb, g3.Gemma3RMSNorm, g3.Gemma3ForCausalLM.forward) == (true_rope, PatchedNorm.__mro__[1], true_forward)
    assert isinstance(patched.model.norm, PatchedNorm)
    assert answers() == before


def test_a_patch_that_raises_midway_is_undone_too():
    """Liger's gemma3 apply swaps the module globals, then raises TypeError on a model of another class."""
    from transformers.models.llama import modeling_llama as ml

    rope, norm = ml.apply_rotary_pos_emb, ml.LlamaRMSNorm

    def half_applied(model):
        ml.apply_rotary_pos_emb = lambda *a, **k: None
        ml.LlamaRMSNorm = type("Patched", (norm,), {})
        raise TypeError("The model must be Gemma3ForCausalLM.")

    with pytest.raises(TypeError), fastpath.kernel_patch_scope():
        fastpath.apply_kernel_patches(half_applied, model=None)
    assert (ml.apply_rotary_pos_emb, ml.LlamaRMSNorm) == (rope, norm)


def test_attention_sinks_prefill_into_a_static_cache_without_a_mask():
    """generate(cache_implementation="static") on a batch without padding: transformers skips the prefill's mask (keys
    are the cache's max_cache_len slots, the new tokens the first of them: sdpa's top-left is_causal). The sinks path
    read a missing mask as "the new tokens come last", so each prompt token attended to the empty slots and the
    first generated token's logits were off by up to 0.8 on this model."""
    varlen, eager = tiny_gpt_oss(register_varlen_attention(), sliding_window=3), tiny_gpt_oss("eager", sliding_window=3)
    eager.load_state_dict(varlen.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static", output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        for mask in (None, torch.ones_like(ids)):
            a, b = varlen.generate(input_ids=ids, attention_mask=mask, **kw), eager.generate(input_ids=ids, attention_mask=mask, **kw)
            assert torch.equal(a.sequences, b.sequences)
            for x, y in zip(a.scores, b.scores):
                torch.testing.assert_close(x, y, atol=LOGITS_ATOL, rtol=0)
