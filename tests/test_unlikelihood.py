"""tasks/engine/unlikelihood.py against a plain autograd reference on full logits: the loss, its two parts and the
gradients for the hidden states and the head's weight, across chunk sizes that split samples, packed samples,
ignored positions and a logit cap."""

import math
from pathlib import Path

import pytest
import torch

from tasks.engine.unlikelihood import EPS, flat_positions, head_loss


def written_candidates(t, labels, context, segment, exempt=()):
    """The paper's candidates at position t, by a loop: every token its sample wrote up to t."""
    return {int(context[s]) for s in range(t + 1) if segment[s] == segment[t]} - {int(labels[t])} - set(exempt)


def continuation_candidates(t, labels, context, segment, exempt=()):
    """Our variant's candidates at position t, by a loop: the tokens that followed an earlier occurrence of t's token in
    its sample (a prompt position's next token included)."""
    return ({int(context[j + 1]) for j in range(t) if segment[j] == segment[t] and context[j] == context[t]}
            - {int(labels[t])} - set(exempt))


CANDIDATES = {"written": written_candidates, "continuations": continuation_candidates}


def reference(hidden, weight, labels, context, segment, alpha, softcap=None, ignore_index=-100, exempt=(), candidates="written"):
    """The token-level loss written the plain way: full logits, candidates by a loop over positions."""
    z = hidden.double() @ weight.double().t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    ce = torch.zeros((), dtype=torch.float64)
    ul = torch.zeros((), dtype=torch.float64)
    for t in range(len(labels)):
        if labels[t] == ignore_index:
            continue
        ce = ce - logp[t, labels[t]]
        for c in CANDIDATES[candidates](t, labels, context, segment, exempt):
            ul = ul - torch.log(torch.clamp(1 - p[t, c], min=EPS))
    return ce + alpha * ul, ce, ul


def case(n=37, d=8, vocab=11, seed=0, segments=(0, 0, 0, 1, 1, 2), ignore_share=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    context = torch.randint(0, vocab, (n,), generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_share] = -100
    # samples of uneven lengths, in order
    cuts = sorted(torch.randperm(n - 1, generator=g)[: len(set(segments)) - 1].add(1).tolist())
    segment = torch.zeros(n, dtype=torch.long)
    for c in cuts:
        segment[c:] += 1
    return hidden, weight, labels, context, segment


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_matches_the_autograd_reference(chunk, alpha, softcap):
    hidden, weight, labels, context, segment = case()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce, ul = head_loss(h1, w1, labels, context, segment, alpha=alpha, chunk=chunk, softcap=softcap)
    (2.5 * loss).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rloss, rce, rul = reference(h2, w2, labels, context, segment, alpha, softcap)
    (2.5 * rloss).backward()
    assert torch.allclose(loss, rloss.to(loss.dtype), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ce, rce.to(ce.dtype), rtol=1e-5)
    # alpha = 0 builds no candidates: its unlikelihood part is not computed
    assert torch.allclose(ul, rul.to(ul.dtype), rtol=1e-5, atol=1e-6) if alpha else ul == 0
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-5, atol=2e-5)  # the pass computes in float32
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("chunk", [1, 5, 16, 200])
def test_samples_that_repeat_their_tokens_many_times_match_the_reference(chunk):
    """Each token a sample wrote is one candidate however often it was written, across chunks that cut samples, with
    exempt tokens and samples that start mid-chunk (a 5-token vocabulary over 90 positions in 7 samples)."""
    hidden, weight, labels, context, segment = case(n=90, d=6, vocab=5, seed=11, segments=tuple(range(7)), ignore_share=0.2)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce, ul = head_loss(h1, w1, labels, context, segment, alpha=0.7, chunk=chunk, exempt=[3])
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rloss, rce, rul = reference(h2, w2, labels, context, segment, 0.7, exempt=[3])
    rloss.backward()
    assert torch.allclose(ul, rul.to(ul.dtype), rtol=1e-5)
    assert torch.allclose(loss, rloss.to(loss.dtype), rtol=1e-5)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-5, atol=2e-5)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=2e-5)


def test_a_candidate_the_model_is_sure_of_adds_its_clamped_loss_and_no_gradient():
    """1 - p under EPS is clamped, as the paper's code does: the loss gets log(EPS), the gradient nothing from it (what
    autograd through clamp gives), so one saturated candidate cannot blow the step up."""
    weight = torch.tensor([[40.0], [0.0], [0.0]], dtype=torch.float64)
    hidden = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)  # p(token 0) ~ 1 - 2e-17
    context, labels, segment = torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([0, 0])
    loss, ce, ul = head_loss(hidden, weight, labels, context, segment, alpha=1.0, chunk=2)
    assert torch.isclose(ul, torch.tensor(-2 * math.log(EPS), dtype=ul.dtype))
    loss.backward()
    h2 = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    plain, _, _ = head_loss(h2, weight, labels, context, segment, alpha=0.0, chunk=2)
    plain.backward()
    assert torch.allclose(hidden.grad, h2.grad)  # the clamped candidate changed nothing in the gradient


def test_the_candidates_are_the_samples_own_tokens():
    """A position's candidates are what its own sample wrote up to it: a token only another sample wrote is not one,
    whatever chunk the samples share."""
    vocab, d = 6, 4
    hidden = torch.zeros(4, d, dtype=torch.float64, requires_grad=True)  # uniform p = 1/6 everywhere
    weight = torch.zeros(vocab, d, dtype=torch.float64)
    context = torch.tensor([1, 2, 3, 3])
    labels = torch.tensor([0, 0, 0, 0])
    one = -torch.log(torch.tensor(1 - 1 / 6))
    for chunk in (1, 2, 4):
        # one sample: positions see {1}, {1,2}, {1,2,3}, {1,2,3}
        _, _, ul = head_loss(hidden, weight, labels, context, torch.tensor([0, 0, 0, 0]), alpha=1.0, chunk=chunk)
        assert torch.isclose(ul, 9 * one)
        # two samples split after position 1: {1}, {1,2} | {3}, {3}
        _, _, ul = head_loss(hidden, weight, labels, context, torch.tensor([0, 0, 1, 1]), alpha=1.0, chunk=chunk)
        assert torch.isclose(ul, 5 * one)
    # an exempt token (an end-of-turn written by an earlier turn) is never a candidate: {1}, {1}, {1,3}, {1,3}
    _, _, ul = head_loss(hidden, weight, labels, context, torch.tensor([0, 0, 0, 0]), alpha=1.0, chunk=chunk, exempt=[2])
    assert torch.isclose(ul, 6 * one)
    # the label itself is never a candidate
    _, _, ul = head_loss(hidden, weight, torch.tensor([1, 2, 3, 3]), context, torch.tensor([0, 0, 0, 0]), alpha=1.0, chunk=3)
    assert torch.isclose(ul, 5 * one)


def test_bf16_weights_give_the_reference_within_bf16():
    hidden, weight, labels, context, segment = case(n=64, d=16, vocab=50, seed=3)
    h1 = hidden.to(torch.bfloat16).requires_grad_()
    w1 = weight.to(torch.bfloat16).requires_grad_()
    loss, _, _ = head_loss(h1, w1, labels, context, segment, alpha=1.0, chunk=16)
    loss.backward()
    assert h1.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.bfloat16
    h2, w2 = h1.detach().double().requires_grad_(), w1.detach().double().requires_grad_()
    rloss, _, _ = reference(h2, w2, labels, context, segment, 1.0)
    rloss.backward()
    assert torch.allclose(loss.double(), rloss, rtol=1e-3)  # the logits are a bf16 matmul, as in Liger's head
    assert (h1.grad.double() - h2.grad).abs().max() <= 0.02 * h2.grad.abs().max()


def test_flat_positions_of_a_packed_row():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 4]])
    labels = torch.tensor([[-100, 6, 7, 8, 9, 4]])  # the second sample's first token labelled: still not the first's target
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    y, ctx, seg = flat_positions(input_ids, labels, position_ids)
    assert y.tolist() == [6, 7, -100, 9, 4, -100]  # shifted; a sample's last position and the row's last predict nothing
    assert ctx.tolist() == [5, 6, 7, 8, 9, 4]
    assert seg.tolist() == [0, 0, 0, 1, 1, 1]


def test_flat_positions_of_a_batch():
    input_ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    y, ctx, seg = flat_positions(input_ids, input_ids.clone())
    assert y.tolist() == [2, 3, -100, 5, 6, -100]
    assert seg.tolist() == [0, 0, 0, 1, 1, 1]


def test_bad_shapes_name_what_was_given():
    with pytest.raises(ValueError, match=r"hidden \(N, d\).*hidden \(2, 3, 4\)"):
        head_loss(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long),
                  torch.zeros(6, dtype=torch.long), alpha=1.0)


def tiny_lora_llama(tie=False, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False))
    return model.train()


def packed_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (1, 20), generator=g)
    pos = torch.tensor([list(range(7)) + list(range(9)) + list(range(4))])
    labels = ids.clone()
    labels[0, [0, 1, 7, 8, 16]] = -100  # prompts; each sample's first token is never a target (as the packing collator sets)
    return ids, pos, labels


def reference_model_loss(model, ids, pos, labels, alpha, candidates="written"):
    """Full logits from the model's own forward, then the loss by loops, normalised by the trained tokens."""
    logits = model(input_ids=ids, position_ids=pos).logits[0].double()
    y, ctx, seg = flat_positions(ids, labels, pos)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    total = torch.zeros((), dtype=torch.float64)
    for t in range(len(y)):
        if y[t] == -100:
            continue
        total = total - logp[t, y[t]]
        for c in CANDIDATES[candidates](t, y, ctx, seg):
            total = total - alpha * torch.log(torch.clamp(1 - p[t, c], min=EPS))
    return total / (y != -100).sum()


@pytest.mark.parametrize("tie,candidates", [(False, "written"), (True, "written"), (False, "continuations")])
def test_attached_to_a_peft_model_gives_the_reference_loss_and_lora_gradients(tie, candidates):
    from tasks.engine.unlikelihood import attach_unlikelihood

    ids, pos, labels = packed_batch()
    ids[0, 10:14] = ids[0, 7:11].clone()  # the second sample repeats its own bigrams: continuations to penalise
    model = tiny_lora_llama(tie)
    ref = reference_model_loss(model, ids, pos, labels, alpha=0.7, candidates=candidates)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    loss_fn, handles = attach_unlikelihood(model, 0.7, chunk=6, candidates=candidates)
    out = model(input_ids=ids, position_ids=pos)
    assert out.logits.shape[1] == 1  # the hooks asked for the last position's logits only
    loss = loss_fn(out, labels, num_items_in_batch=int((flat_positions(ids, labels, pos)[0] != -100).sum()))
    loss.backward()
    assert torch.allclose(loss.double(), ref, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, want[n].to(p.grad.dtype), rtol=1e-4, atol=1e-6), n
    for h in handles:
        h.remove()
    assert model(input_ids=ids, position_ids=pos).logits.shape[1] == 20


def test_alpha_zero_is_the_models_own_loss_and_eval_mode_is_untouched():
    from tasks.engine.unlikelihood import attach_unlikelihood

    ids, pos, labels = packed_batch(seed=2)
    model = tiny_lora_llama(seed=3)
    own = model(input_ids=ids, position_ids=pos, labels=labels).loss
    loss_fn, handles = attach_unlikelihood(model, 0.0)
    loss = loss_fn(model(input_ids=ids, position_ids=pos), labels)
    assert torch.allclose(loss, own, rtol=1e-5)
    model.eval()
    assert model(input_ids=ids, position_ids=pos).logits.shape[1] == 20


def test_the_keys_hold_the_alpha_only_when_set(tiny_cfg):
    from types import SimpleNamespace

    from tasks.probe import cache_key as probe_key
    from tasks.train import cache_key as train_key

    data, probe = SimpleNamespace(key="d", model_fingerprint="m"), SimpleNamespace(key="p")
    t = tiny_cfg.training
    for key in (lambda training: train_key(data, probe, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training),
                lambda training: probe_key(data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, tiny_cfg.budget, "cpu")):
        assert key(t) == key(t.model_copy(update={"unlikelihood_alpha": None})) == key(t.model_copy(update={"unlikelihood_alpha": 0.0}))
        assert key(t.model_copy(update={"unlikelihood_alpha": 1.0})) != key(t)


def test_a_probe_timed_on_another_pass_is_not_reused(tiny_cfg, monkeypatch):
    """The pass's version is in the probe key of a run with unlikelihood (a probe timed on the dense pass, 1.17 s a step,
    would plan a sparse-pass run's steps), and not in one without."""
    from types import SimpleNamespace

    import tasks.engine.unlikelihood as ul_mod
    from tasks.probe import cache_key as probe_key

    data = SimpleNamespace(key="d", model_fingerprint="m")
    t = tiny_cfg.training
    key = lambda training: probe_key(data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, tiny_cfg.budget, "cpu")  # noqa: E731
    with_ul, without = key(t.model_copy(update={"unlikelihood_alpha": 1.0})), key(t)
    monkeypatch.setattr(ul_mod, "PASS_VERSION", "another pass")
    assert key(t.model_copy(update={"unlikelihood_alpha": 1.0})) != with_ul
    assert key(t) == without


# The pass's code (`pass_code`) at each PASS_VERSION: a change of the code without a new version (b645bef, whose float32
# copy fewer lowered the pass's peak memory, left "(d42cfda)" in the probe key), or of the version without the code, fails
# test_the_pass_version_changes_with_the_pass. A code change that leaves the pass's time, memory and exempt tokens as
# they were (a rename, a log line) records its new fingerprint under the same version instead.
PASS_CODE = {
    "sparse candidates, stop tokens exempt in the probe (d42cfda)": "fb39d39961230f82",  # 67337b8 (the span cap)
    # 02210f7910a436bb until training.unlikelihood_candidates (`written` computes bit for bit what it did: the span cut
    # moved into `_spans`; `continuations` is keyed by its own setting) and perf-19's set_aside_parts / held_parts (how
    # the logs read the parts, not the pass): this version's probes stay good
    "sparse candidates in spans of at most MAX_PAIRS pairs, no float32 copy of the logits (b645bef)": "d561238b41a0671d",
}


def pass_code(source: str) -> str:
    """A fingerprint of tasks/engine/unlikelihood.py's code: its syntax tree without docstrings or PASS_VERSION's line
    (comments are not in it), written out field by field so that Python 3.11 to 3.13 give the same one."""
    import ast
    import hashlib

    def tree(node):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str))]
        out = [type(node).__name__]
        for name, value in ast.iter_fields(node):
            if isinstance(value, ast.AST):
                out.append((name, tree(value)))
            elif isinstance(value, list) and value:  # an empty list left out: 3.12's type_params
                out.append((name, [tree(v) if isinstance(v, ast.AST) else repr(v) for v in value]))
            elif value is not None and not isinstance(value, list):
                out.append((name, repr(value)))
        return out

    module = ast.parse(source)
    module.body = [s for s in module.body if not (isinstance(s, ast.Assign) and any(getattr(t, "id", None) == "PASS_VERSION" for t in s.targets))]
    return hashlib.sha256(repr(tree(module)).encode()).hexdigest()[:16]


def test_the_pass_version_changes_with_the_pass(tiny_cfg, monkeypatch):
    """A review: b645bef changed the pass's memory (log_softmax casting the logits itself: one float32 chunk x vocab
    copy fewer at the peak) and kept PASS_VERSION, so a probe that measured the earlier pass's peak memory was reused.
    The pass's code is pinned to its version here, and the version is in the probe key of a run with unlikelihood."""
    from types import SimpleNamespace

    import tasks.engine.unlikelihood as ul_mod
    from tasks.probe import cache_key as probe_key

    code = pass_code(Path(ul_mod.__file__).read_text())
    assert PASS_CODE.get(ul_mod.PASS_VERSION) == code, (
        f"tasks/engine/unlikelihood.py's code changed (now {code}) since PASS_VERSION {ul_mod.PASS_VERSION!r} was set: if the "
        "pass's time, memory or exempt tokens changed, give it a new PASS_VERSION, else record the new code under this one")
    assert list(PASS_CODE.values()).count(code) == 1  # a new version for the same code: name what changed, or keep the old
    data = SimpleNamespace(key="d", model_fingerprint="m")
    t = tiny_cfg.training.model_copy(update={"unlikelihood_alpha": 1.0})
    key = lambda: probe_key(data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, t, tiny_cfg.budget, "cpu")  # noqa: E731
    now, current = key(), ul_mod.PASS_VERSION
    for version in PASS_CODE:  # each version its own probe key: a probe of the earlier pass is not reused
        monkeypatch.setattr(ul_mod, "PASS_VERSION", version)
        assert (key() == now) == (version == current), version


@pytest.mark.parametrize("max_pairs", [1, 7, 40, 10_000])
def test_spans_hold_at_most_max_pairs_and_give_the_same_loss(max_pairs, monkeypatch):
    """A chunk whose positions have written many distinct tokens is cut into spans of at most `max_pairs` candidate
    pairs (one position alone may hold more), so the pass's memory follows the chunk, not the sample; the loss and the
    gradients are the same however it is cut."""
    import tasks.engine.unlikelihood as ul_mod
    from tasks.engine.unlikelihood import candidate_plan

    hidden, weight, labels, context, segment = case(n=80, d=6, vocab=23, seed=5, segments=(0, 1), ignore_share=0.1)
    spans, _ = candidate_plan(context, labels, segment, 23, -100, 64, max_pairs=max_pairs)
    assert spans[0][0] == 0 and spans[-1][1] == 80 and all(b1 == a2 for (_, b1, _), (a2, _, _) in zip(spans, spans[1:]))
    assert all(b - a <= 64 and (size <= max_pairs or b - a == 1) for a, b, size in spans)
    grads = []
    for cap in (max_pairs, 1 << 30):
        h = hidden.clone().requires_grad_()
        monkeypatch.setattr(ul_mod, "MAX_PAIRS", cap)
        loss, _, ul = head_loss(h, weight, labels, context, segment, alpha=1.0, chunk=64)
        loss.backward()
        grads.append((loss.detach(), ul, h.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6) and torch.allclose(grads[0][1], grads[1][1], rtol=1e-6)
    assert torch.allclose(grads[0][2], grads[1][2], rtol=1e-6, atol=1e-7)


def test_exempt_ids_as_a_tensor_or_a_list_give_the_same_loss():
    hidden, weight, labels, context, segment = case(n=40, d=6, vocab=9, seed=2)
    losses = [head_loss(hidden, weight, labels, context, segment, alpha=1.0, chunk=16, exempt=e)[2]
              for e in ([2, 5], (5, 2), torch.tensor([2, 5]), torch.tensor([[2], [5]], dtype=torch.int32))]
    assert all(torch.equal(losses[0], x) for x in losses[1:])
    assert not torch.equal(losses[0], head_loss(hidden, weight, labels, context, segment, alpha=1.0, chunk=16)[2])


def test_a_negative_or_infinite_alpha_is_one_line_naming_the_key():
    from tasks.config import ConfigError, load_config

    for bad in ("-1", "inf"):
        with pytest.raises((ConfigError, ValueError), match="unlikelihood_alpha"):
            load_config(profile="tiny", overrides=[f"training.unlikelihood_alpha={bad}"])


@pytest.fixture(scope="module")
def tiny_data(tiny_cfg, shared_artifacts):
    from tasks.data import load_dataset_records

    return load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)


@pytest.mark.parametrize("engine,candidates", [("fused", "written"), ("padded", "written"), ("fused", "continuations")])
def test_stage_4_trains_with_unlikelihood_on_both_engines(tiny_cfg, tiny_data, shared_artifacts, engine, candidates, monkeypatch):
    """Through the probe and train_adapter on the tiny model: the loss runs through head_loss in every training forward
    (packed rows split by their positions on the fused engine, padded rows on the padded one) with the candidate set
    the config names, the special and stop tokens are exempt, the log says so, the loss is finite and the adapter is saved."""
    import math
    from pathlib import Path

    import tasks.engine.unlikelihood as ul_mod
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    calls = []
    real = ul_mod.head_loss
    monkeypatch.setattr(ul_mod, "head_loss", lambda *a, **k: calls.append((a[4].max().item() + 1, k["alpha"], [int(i) for i in k["exempt"]],
                                                                          k["candidates"])) or real(*a, **k))
    training = tiny_cfg.training.model_copy(update={"engine": engine, "max_steps": 2, "unlikelihood_alpha": 1.0, "unlikelihood_candidates": candidates})
    # a stop token that is not one of the tokenizer's special ones (a template's end-of-turn often is not)
    stopping = tiny_data.model_copy(update={"stop_token_ids": [*tiny_data.stop_token_ids, 100]})
    probe = probe_throughput(stopping, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, tiny_cfg.budget, "cpu", shared_artifacts)
    assert calls, "the probe did not time the unlikelihood pass"
    # the probe times stage 4's pass: the same exempt tokens (stop tokens included, not only the special ones)
    assert all(100 in exempt and mode == candidates for _, _, exempt, mode in calls)
    lines = []
    calls.clear()
    rec = train_adapter(tiny_data, probe.model_copy(update={"max_steps": 2, "key": f"unlikelihood-{engine}-{candidates}"}), tiny_cfg.model, tiny_cfg.quant,
                        tiny_cfg.lora, training, shared_artifacts, log_fn=lines.append)
    assert rec.steps == 2 and math.isfinite(rec.final_loss)
    assert calls and all(alpha == 1.0 and mode == candidates for _, alpha, _, mode in calls)
    assert all(set(tiny_data.stop_token_ids) <= set(exempt) for _, _, exempt, _ in calls)
    if engine == "padded":
        assert any(samples > 1 for samples, _, _, _ in calls)  # rows of a padded batch are samples apart
    words = {"written": "the tokens already written", "continuations": "the continuations of earlier occurrences"}[candidates]
    assert any(f"unlikelihood alpha 1 on {words}" in line for line in lines)
    step_lines = [line for line in lines if line.startswith("step ")]
    assert step_lines and all("cross-entropy" in line and "unlikelihood" in line for line in step_lines)
    assert Path(rec.adapter_dir).is_dir()


@pytest.mark.parametrize("full_rows", [None, (2, 6)])
def test_a_head_only_where_trained_batch_gives_the_same_loss(full_rows):
    """The packing collator's `keep_logits` batches (targets at the trained positions only, `shift_labels`) give the
    loss and gradients the plain packed batch gives: the targets are put back in place, the model's own loss is not run."""
    from tasks.engine.fastpath import PaddingFreeCollator
    from tasks.engine.unlikelihood import attach_unlikelihood

    g = torch.Generator().manual_seed(5)
    samples = [{"input_ids": torch.randint(0, 97, (6,), generator=g).tolist()} for _ in range(2)]
    for s in samples:
        s["labels"] = [-100, -100] + s["input_ids"][2:]
    results = []
    for keep in (False, True):
        model = tiny_lora_llama(seed=4)
        loss_fn, _ = attach_unlikelihood(model, 1.0, chunk=5, exempt=[3])
        batch = PaddingFreeCollator(keep_logits=keep, full_rows=full_rows)(samples)
        labels = batch.pop("labels")
        assert ("logits_to_keep" in batch) == keep
        loss = loss_fn(model(**batch), labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-6)
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(ga, gb))


@pytest.mark.parametrize("arch,key,value", [("granite", "logits_scaling", 8.0), ("cohere", "logit_scale", 0.25)])
def test_a_model_that_scales_its_logits_gets_its_own_loss_at_alpha_zero(arch, key, value):
    """Granite divides the head's output by logits_scaling, Cohere multiplies it by logit_scale: the pass does the same,
    so alpha = 0 is the model's own loss (a review: 6.27 against 10.29 on Granite before)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.engine.unlikelihood import attach_unlikelihood

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, **{key: value})
    model = AutoModelForCausalLM.from_config(cfg).train()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    ids, pos, labels = packed_batch(seed=6)
    own = model(input_ids=ids, position_ids=pos, labels=labels).loss
    loss_fn, _ = attach_unlikelihood(model, 0.0)
    assert torch.allclose(loss_fn(model(input_ids=ids, position_ids=pos), labels), own, rtol=1e-4)


def test_ids_outside_the_head_are_not_exempted_from_the_wrong_row():
    from tasks.engine.unlikelihood import attach_unlikelihood

    ids, pos, labels = packed_batch(seed=7)
    losses = []
    for exempt in ([], [-1, 97, 10_000]):  # none of them a token the head can produce
        model = tiny_lora_llama(seed=8)
        loss_fn, _ = attach_unlikelihood(model, 1.0, exempt=exempt)
        losses.append(loss_fn(model(input_ids=ids, position_ids=pos), labels).detach())
    assert torch.equal(losses[0], losses[1])


def test_the_log_split_after_a_resume_covers_the_steps_since_the_resume():
    """BudgetGuard's step line divides the parts by the steps since its last line; a resumed run's first line covers
    the steps since the resume, not since step 0 (a review: resumed at step 2, step 3's parts were shown divided by 3)."""
    from types import SimpleNamespace

    from tasks.train import BudgetGuard

    lines = []
    guard = BudgetGuard(Path("/nonexistent"), 100.0, 0.0, 600.0, 0.0, 0.0, log_fn=lines.append)
    guard.loss_parts = lambda: {"ce": 2.0, "ul": 0.5}
    state = SimpleNamespace(global_step=2, num_input_tokens_seen=0, max_steps=4)
    guard.on_train_begin(SimpleNamespace(), state, None)
    state.global_step = 3
    guard.on_log(SimpleNamespace(logging_steps=1), state, None, logs={"loss": 2.5, "learning_rate": 1e-4})
    assert "cross-entropy 2.0000 + unlikelihood 0.5000" in lines[-1]


# training.unlikelihood_candidates=continuations: the tokens that followed earlier occurrences of the current token


def plan_candidates(plan_fn, labels, context, segment, vocab, chunk, exempt=(), max_pairs=None):
    """Each position's candidates as the pass lists them (`plan_fn` + `chunk_pairs`): {position: [(token, keep), ...]}."""
    from tasks.engine.unlikelihood import chunk_pairs

    spans, plan = plan_fn(context, labels, segment, vocab, -100, chunk, torch.tensor(list(exempt), dtype=torch.long), max_pairs=max_pairs)
    assert spans[0][0] == 0 and spans[-1][1] == len(labels) and all(b1 == a2 for (_, b1, _), (a2, _, _) in zip(spans, spans[1:]))
    out: dict = {t: [] for t in range(len(labels))}
    for a, b, size in spans:
        rows, tokens, keep = chunk_pairs(plan, labels, a, b, size)
        assert len(rows) == size
        for r, c, k in zip(rows.tolist(), tokens.tolist(), keep.tolist()):
            out[a + r].append((c, k))
    return spans, out


def random_positions(seed, n=60, vocab=6, samples=4, ignore_runs=3):
    """Flat positions with few distinct tokens (so tokens and bigrams repeat), uneven samples, runs of ignored labels
    (prompts) and labels that are each position's next token in its sample, as flat_positions makes them."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, vocab, (n,), generator=g)
    cuts = sorted(torch.randperm(n - 1, generator=g)[: samples - 1].add(1).tolist())
    segment = torch.zeros(n, dtype=torch.long)
    for c in cuts:
        segment[c:] += 1
    labels = torch.full((n,), -100)
    labels[:-1] = torch.where(segment[1:] == segment[:-1], context[1:], -100)
    for _ in range(ignore_runs):
        a = int(torch.randint(0, n, (1,), generator=g))
        labels[a: a + int(torch.randint(1, 8, (1,), generator=g))] = -100
    return labels, context, segment


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("chunk,max_pairs", [(1, None), (5, None), (64, None), (64, 3), (7, 1)])
def test_continuation_candidates_equal_the_brute_force_sets(seed, chunk, max_pairs):
    """Each trained position's listed candidates are exactly the reference set (each once; its own label listed at most
    once, with no weight; exempt tokens never), across samples, ignored runs, repeated tokens, chunk cuts and span caps."""
    from tasks.engine.unlikelihood import continuation_plan

    labels, context, segment = random_positions(seed)
    exempt = (seed % 6,) if seed % 2 else ()
    spans, got = plan_candidates(continuation_plan, labels, context, segment, 6, chunk, exempt, max_pairs)
    if max_pairs is not None:
        assert all(size <= max_pairs or b - a == 1 for a, b, size in spans)
    for t in range(len(labels)):
        listed = [c for c, _ in got[t]]
        assert len(listed) == len(set(listed)), (t, listed)  # each once
        if labels[t] == -100:
            assert not listed, t  # not trained: no pairs
            continue
        assert {c for c, keep in got[t] if keep} == continuation_candidates(t, labels, context, segment, exempt), t
        assert all(keep == (c != int(labels[t])) for c, keep in got[t]), t
    # the written plan on the same inputs is still the paper's set (its own reference)
    from tasks.engine.unlikelihood import candidate_plan

    _, got = plan_candidates(candidate_plan, labels, context, segment, 6, chunk, exempt, max_pairs)
    for t in range(len(labels)):
        if labels[t] != -100:
            assert {c for c, keep in got[t] if keep} == written_candidates(t, labels, context, segment, exempt), t


def test_a_prompt_bigram_is_a_continuation_and_another_sample_s_is_not():
    """The prompt (labels ignored) is written context: the token that followed the current token in the prompt is a
    candidate. A bigram of another sample is not; a token that only appeared (not followed the current one) is not."""
    from tasks.engine.unlikelihood import continuation_plan

    #               prompt (ignored)  | answer               | next sample
    context = torch.tensor([1, 2, 3, 4, 1, 5, 1, 6, 2, 1, 9])
    segment = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    labels = torch.tensor([-100, -100, -100, 1, 5, 1, 6, -100, -100, 9, -100])
    _, got = plan_candidates(continuation_plan, labels, context, segment, 10, chunk=4)
    cands = {t: {c for c, keep in got[t] if keep} for t in got}
    assert cands[4] == {2}  # at the second 1: the prompt's 1 -> 2 (its label 5 is not one, nor 3 and 4, written only)
    assert cands[6] == {2, 5}  # at the third 1: 1 -> 2 (prompt) and 1 -> 5 (answer); its label 6 left out
    assert cands[3] == set() and cands[5] == set()  # 4 and 5 had not been written before
    assert cands[9] == set()  # another sample: sample 0's 1 -> 2, 1 -> 5 do not count
    assert [c for c, _ in got[6]].count(2) == 1


def test_exempt_continuations_are_never_candidates():
    """An end-of-turn that followed the current token before (the end of an earlier turn) is not pushed down."""
    from tasks.engine.unlikelihood import continuation_plan

    context = torch.tensor([7, 1, 3, 7, 4, 2, 7])
    segment = torch.zeros(7, dtype=torch.long)
    labels = torch.tensor([1, 3, -100, 4, 2, -100, 5])
    for exempt, want in (((), {1, 4}), ((1,), {4})):
        _, got = plan_candidates(continuation_plan, labels, context, segment, 8, chunk=3, exempt=exempt)
        assert {c for c, keep in got[6] if keep} == want


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_continuations_match_the_autograd_reference(chunk, softcap):
    """The loss, its parts and the gradients of the continuation set against autograd of the formula on full logits."""
    labels, context, segment = random_positions(3, n=40, vocab=5, samples=3)
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(40, 6, generator=g, dtype=torch.float64) * 0.5  # no candidate near p = 1, where float32's log(1 - p) drifts
    weight = torch.randn(5, 6, generator=g, dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce, ul = head_loss(h1, w1, labels, context, segment, alpha=0.8, chunk=chunk, softcap=softcap, exempt=[4], candidates="continuations")
    (1.5 * loss).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rloss, rce, rul = reference(h2, w2, labels, context, segment, 0.8, softcap, exempt=[4], candidates="continuations")
    (1.5 * rloss).backward()
    assert rul > 0  # the case has continuations to penalise
    assert torch.allclose(ul, rul.to(ul.dtype), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ce, rce.to(ce.dtype), rtol=1e-5)
    assert torch.allclose(loss, rloss.to(loss.dtype), rtol=1e-5, atol=1e-6)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-5, atol=2e-5)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=2e-5)
    # and it is a different loss from the paper's on the same positions
    _, _, ul_written = head_loss(hidden, weight, labels, context, segment, alpha=0.8, chunk=chunk, softcap=softcap, exempt=[4])
    assert not torch.allclose(ul, ul_written)


@pytest.mark.parametrize("max_pairs", [1, 3, 10_000])
def test_continuation_spans_hold_at_most_max_pairs_and_give_the_same_loss(max_pairs, monkeypatch):
    import tasks.engine.unlikelihood as ul_mod
    from tasks.engine.unlikelihood import continuation_plan

    labels, context, segment = random_positions(4, n=80, vocab=4, samples=2, ignore_runs=1)
    spans, _ = continuation_plan(context, labels, segment, 4, -100, 64, max_pairs=max_pairs)
    assert all(b - a <= 64 and (size <= max_pairs or b - a == 1) for a, b, size in spans)
    if max_pairs == 1:
        assert len(spans) > 2  # the cap cut the chunk
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(80, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    results = []
    for cap in (max_pairs, 1 << 30):
        h = hidden.clone().requires_grad_()
        monkeypatch.setattr(ul_mod, "MAX_PAIRS", cap)
        loss, _, ul = head_loss(h, weight, labels, context, segment, alpha=1.0, chunk=64, candidates="continuations")
        loss.backward()
        results.append((loss.detach(), ul, h.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6) and torch.allclose(results[0][1], results[1][1], rtol=1e-6)
    assert torch.allclose(results[0][2], results[1][2], rtol=1e-6, atol=1e-7)


def test_an_unknown_candidate_set_is_one_line_naming_the_key_and_the_choices():
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(profile="tiny", overrides=["training.unlikelihood_candidates=bigrams"])
    (p,) = err.value.problems
    assert p.startswith("training.unlikelihood_candidates:") and "'written'" in p and "'continuations'" in p and "bigrams" in p, p
    assert "\n" not in p
    with pytest.raises(ValueError, match=r"unlikelihood_candidates must be one of written, continuations, got 'bigrams'"):
        head_loss(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                  torch.zeros(2, dtype=torch.long), alpha=1.0, candidates="bigrams")


def test_the_keys_hold_the_candidate_set_only_when_continuations_with_an_alpha(tiny_cfg):
    """`written` (the default) keeps every key the runs had before the setting existed; `continuations` is keyed in the
    probe and training keys where it acts (the alpha set), and nowhere without the alpha."""
    from types import SimpleNamespace

    from tasks.probe import cache_key as probe_key
    from tasks.train import cache_key as train_key

    data, probe = SimpleNamespace(key="d", model_fingerprint="m"), SimpleNamespace(key="p")
    t = tiny_cfg.training
    assert t.unlikelihood_candidates == "written"
    for key in (lambda training: train_key(data, probe, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training),
                lambda training: probe_key(data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, tiny_cfg.budget, "cpu")):
        on = t.model_copy(update={"unlikelihood_alpha": 1.0})
        assert key(t) == key(t.model_copy(update={"unlikelihood_candidates": "continuations"}))  # no alpha: acts on nothing
        assert key(on) != key(on.model_copy(update={"unlikelihood_candidates": "continuations"}))
