"""Token-level unlikelihood on the tokens already written (Welleck et al. 2020, "Neural Text Generation with Unlikelihood
Training", arXiv:1908.04319, section 5.1), computed with cross-entropy in one chunked pass over the LM head.

At each trained position t the model is asked, besides the usual cross-entropy on the next token y_t, to give little
probability to the tokens its sample already holds up to t (the candidates C_t, y_t itself left out):

    loss_t = -log p(y_t) - alpha * sum_{c in C_t} log(1 - p(c))

Greedy decoding of a small model falls into loops by picking a token it has just written; the unlikelihood term is
what makes that costly in training. The paper's token-level form (not its sequence-level one, which needs the model's
own generations) cut repeated next 4-grams of greedy continuations by about a third (.44 -> .28) on a 16-layer
Wikitext-103 model, perplexity 25.6 -> 26.9.

Like Liger's fused linear cross-entropy, the pass never holds the (tokens x vocab) logits: it walks the positions in
chunks, and each chunk's gradient for the hidden states and the head's weight is made in the forward (the derivatives
below are closed forms), so the backward only scales them. With p = softmax(z) over the chunk's logits z:

    d(-log p(y)) / dz = p - onehot(y)
    d(-sum_c log(1 - p_c)) / dz = r - p * sum(r),   r_k = p_k / (1 - p_k) for k in C_t, 0 elsewhere

1 - p is clamped at `EPS` as the paper's code clamps it; a clamped candidate adds its clamped term to the loss and
nothing to the gradient, as autograd through `clamp` gives. A model that caps its logits (Gemma-2's
`final_logit_softcapping`: z = cap * tanh(z_raw / cap)) gets the cap and its chain-rule factor.

Positions are flat: `hidden` (N, d) and `labels` (N,) already shifted (the hidden state at t predicts labels[t]),
`context` (N,) the token at t (the last token the model has seen there), `segment` (N,) which sample t belongs to,
non-decreasing (a packed row's samples, or the rows of a batch one after another). A position whose label is
`ignore_index` (prompt, padding) is not trained on and adds nothing; its token still counts as written for the
positions after it (the prompt's words are part of what the answer should not repeat, as in the paper's contexts).
Tokens in `exempt` are never candidates: the end-of-turn and other special tokens a multi-turn sample has written
before (penalised, they would teach the later turns not to end, the opposite of what this is for).

`candidates="continuations"` (training.unlikelihood_candidates) is our variant, not the paper's: C_t is the tokens that
FOLLOWED earlier occurrences of the current token in the sample, {context[j + 1] : j < t, context[j] == context[t], same
sample}, each once, y_t and `exempt` left out (the bigram-continuation form). Why: the paper's set penalises every token
written so far, so the repeats an answer needs (markdown marks, a required keyword, the same word down a list) are
pushed down at every position; on demo-gpu it cut the loops and cost IFEval points on exactly those answer types
(docs/BENCHMARKS.md "Setting q3"). A greedy loop is the model copying the continuation it wrote after an earlier
occurrence of the token it now sits on; this set penalises that copy only. A prompt position's next token counts (the
prompt's own bigrams are what a copy would repeat), as its token counts as written in the paper's form.
"""

from __future__ import annotations

EPS = 1e-5


# b645bef: log_softmax casts the logits to float32 itself, so a chunk holds the head's-dtype logits and one float32
# (chunk x vocab) tensor at its peak, not two float32 ones: a lower peak memory than the pass 67337b8 keyed (as
# "sparse candidates, stop tokens exempt in the probe (d42cfda)", its span cap included), whose probes are not reused.
PASS_VERSION = "sparse candidates in spans of at most MAX_PAIRS pairs, no float32 copy of the logits (b645bef)"
"""What the pass computes and costs, in the probe's key of a run that sets training.unlikelihood_alpha (and through it
stage 4's): a probe timed on an earlier pass (7b810f5's dense one: 1.17 s a step where this one takes ~0.83) is not
reused, nor its peak memory. Runs without unlikelihood keep their keys. Change it when the pass's time, memory or
exempt tokens change (tests/test_unlikelihood.py pins the pass's code to it and fails on a change of either alone)."""

MAX_PAIRS = 1 << 22
"""Candidate pairs a chunk scores at most (~80 bytes each in the chunk's temporaries: ~330 MiB): a chunk whose positions
have written more distinct tokens than this (one long sample of many distinct tokens) is split, so the pass's memory
follows the chunk, not the sample's length times its vocabulary."""


def candidate_plan(context, labels, segment, vocab: int, ignore_index: int, chunk: int, exempt=None, max_pairs: int | None = None):
    """How the pass walks the positions when it scores unlikelihood: [(a, b, pairs), ...] spans of at most `chunk`
    positions and at most `max_pairs` candidate pairs (a single position may exceed it alone), and the O(N) arrays
    `chunk_pairs` makes each span's pairs from. For each trained position i the candidates are the tokens its sample has
    written up to i (context[j], j <= i, same sample), each once, its own label and `exempt` left out.

    Each (sample, token) is taken at its first occurrence: position i's candidates are the first occurrences in its
    sample at or before i, a run of the first-occurrence positions in order (from the sample's first one to the last
    one <= i). So the pairs come from counts and offsets, never from a (positions x vocab) mask, and only one span's
    pairs exist at a time. One host sync a call (the positions' pair counts, to cut the spans)."""
    import torch

    n = context.shape[0]
    device = context.device
    idx = torch.arange(n, device=device)
    context = context.long()
    # first occurrence of each (sample, token): a stable sort keeps the earliest position first in each run
    key = segment.long() * (vocab + 1) + context
    sorted_key, order = torch.sort(key, stable=True)
    first_sorted = torch.ones(n, dtype=torch.bool, device=device)
    first_sorted[1:] = sorted_key[1:] != sorted_key[:-1]
    first = torch.zeros(n, dtype=torch.bool, device=device)
    first[order] = first_sorted
    if exempt is not None and exempt.numel():
        first &= ~torch.isin(context, exempt)
    upto = first.long().cumsum(0)  # first occurrences at positions <= i, all samples
    # the first-occurrence positions in order, without a sync: the others all write into a spare last slot
    where_first = torch.zeros(n + 1, dtype=torch.long, device=device)
    where_first[torch.where(first, upto - 1, torch.full_like(upto, n))] = idx
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = segment[1:] != segment[:-1]
    sample_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
    before = upto[sample_start] - first[sample_start].long()  # first occurrences before the sample: its run's start in `where_first`
    count = torch.where(labels != ignore_index, upto - before, torch.zeros_like(upto))
    return _spans(count, chunk, max_pairs), (context, count, before, where_first)


def _spans(count, chunk: int, max_pairs: int | None) -> list:
    """[(a, b, pairs), ...]: runs of at most `chunk` positions and `max_pairs` pairs (a single position may exceed it
    alone), from each position's pair count. The plan's one host sync."""
    import bisect

    n = count.shape[0]
    total = count.cumsum(0).tolist()  # the sync
    max_pairs = MAX_PAIRS if max_pairs is None else max_pairs
    spans, a = [], 0
    while a < n:
        done = total[a - 1] if a else 0
        b = min(a + chunk, n)
        if total[b - 1] - done > max_pairs:
            b = max(a + 1, bisect.bisect_right(total, done + max_pairs, a, b))
        spans.append((a, b, total[b - 1] - done))
        a = b
    return spans


def continuation_plan(context, labels, segment, vocab: int, ignore_index: int, chunk: int, exempt=None, max_pairs: int | None = None):
    """`candidate_plan`'s contract (the spans and the arrays `chunk_pairs` reads) for `candidates="continuations"`: the
    candidates of trained position t are the tokens that followed earlier occurrences of its token in its sample,
    {context[j + 1] : j < t, context[j] == context[t], same sample}, each once, `exempt` left out (its own label is listed
    with no weight by `chunk_pairs`). A prompt position (label ignore_index) is an occurrence like any other: its next
    token is a continuation.

    Each (sample, token, next token) bigram is taken at its first occurrence. With the positions ordered by (sample,
    token) and then position, position t's candidates are the first-occurrence bigrams of its (sample, token) group
    before it: a run of a list of those bigrams in that order. So the pairs come from counts and offsets, as in
    `candidate_plan`; `chunk_pairs` reads each candidate's token from the next-token array, where `candidate_plan`'s
    reads it from `context`. One host sync."""
    import torch

    n = context.shape[0]
    device = context.device
    idx = torch.arange(n, device=device)
    context = context.long()
    segment = segment.long()
    # the token after each position in its sample (-1: the sample's last position, whose next token is another sample's)
    nxt = torch.full_like(context, -1)
    nxt[:-1] = torch.where(segment[1:] == segment[:-1], context[1:], -1)
    # (sample, token) groups, positions in order within each: a stable sort keeps them so
    sorted_group, order = torch.sort(segment * (vocab + 1) + context, stable=True)
    group_starts = torch.ones(n, dtype=torch.bool, device=device)
    group_starts[1:] = sorted_group[1:] != sorted_group[:-1]
    group = group_starts.long().cumsum(0) - 1  # the group's rank, at the sorted positions (< n: keys stay small)
    # first occurrence of each (group, next token) bigram: a stable sort keeps the earliest position first in each run
    next_sorted = nxt[order]
    bigram = group * (vocab + 1) + torch.where(next_sorted >= 0, next_sorted, vocab)  # no next token: a key of its own
    sorted_bigram, order2 = torch.sort(bigram, stable=True)
    first2 = torch.ones(n, dtype=torch.bool, device=device)
    first2[1:] = sorted_bigram[1:] != sorted_bigram[:-1]
    first = torch.zeros(n, dtype=torch.bool, device=device)  # at the (group, position)-sorted positions
    first[order2] = first2
    first &= next_sorted >= 0
    if exempt is not None and exempt.numel():
        first &= ~torch.isin(next_sorted, exempt)
    upto = first.long().cumsum(0)
    before_me = upto - first.long()  # first-occurrence bigrams earlier in the sorted order: those of earlier groups, then mine before me
    # the first-occurrence bigrams' positions in sorted order, without a sync: the others all write into a spare last slot
    where_first = torch.zeros(n + 1, dtype=torch.long, device=device)
    where_first[torch.where(first, upto - 1, torch.full_like(upto, n))] = order
    group_start = torch.cummax(torch.where(group_starts, idx, torch.zeros_like(idx)), 0).values
    start = before_me[group_start]  # the group's run's start in `where_first`
    before = torch.empty_like(start)
    before[order] = start
    count = torch.zeros_like(start)
    count[order] = before_me - start
    count = torch.where(labels != ignore_index, count, torch.zeros_like(count))
    return _spans(count, chunk, max_pairs), (nxt, count, before, where_first)


PLANS = {"written": candidate_plan, "continuations": continuation_plan}
"""training.unlikelihood_candidates -> the plan that lists each position's candidates (see the module docstring)."""


def chunk_pairs(plan, labels, a: int, b: int, size: int):
    """The candidate pairs of positions a..b-1 (`size` of them, from `candidate_plan`): (rows, tokens, keep), `rows` the
    position within the span, `tokens` the candidate, `keep` False where the candidate is the position's own label
    (listed with no weight, so the list's length is known from the counts alone)."""
    import torch

    context, count, before, where_first = plan
    device = context.device
    c = count[a:b]
    rows = torch.repeat_interleave(torch.arange(b - a, device=device), c, output_size=size)
    offsets = torch.arange(size, device=device) - (c.cumsum(0) - c)[rows]
    tokens = context[where_first[before[a + rows] + offsets]]
    return rows, tokens, tokens != labels[a + rows].long()


class _HeadLoss:
    """The chunked pass (a torch.autograd.Function made on first use, so importing this module needs no torch)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class HeadLoss(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, labels, context, segment, alpha, chunk, softcap, ignore_index, exempt, scale, candidates):
                    need_w = ctx.needs_input_grad[1]  # a frozen (tied, embedding) head: no vocab x d gradient made
                    grad_h, grad_w, ce, ul = _forward_and_grads(hidden, weight, labels, context, segment, alpha, chunk, softcap, ignore_index, need_w, exempt, scale,
                                                                candidates)
                    ctx.save_for_backward(grad_h, grad_w)
                    ctx.mark_non_differentiable(ce, ul)
                    return ce + alpha * ul, ce, ul

                @staticmethod
                def backward(ctx, grad_loss, _grad_ce, _grad_ul):
                    grad_h, grad_w = ctx.saved_tensors
                    return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype) if grad_w.numel() else None,
                            None, None, None, None, None, None, None, None, None, None)

            cls.fn = HeadLoss
        return cls.fn


def _forward_and_grads(hidden, weight, labels, context, segment, alpha: float, chunk: int, softcap: float | None, ignore_index: int,
                       need_w: bool = True, exempt=None, scale: float = 1.0, candidates: str = "written"):
    import torch

    n = hidden.shape[0]
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros(weight.shape if need_w else (0,), dtype=torch.float32, device=weight.device)
    ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
    ul = torch.zeros((), dtype=torch.float32, device=hidden.device)
    if alpha:
        spans, plan = PLANS[candidates](context, labels, segment, weight.shape[0], ignore_index, chunk, exempt)
    else:
        spans, plan = [(a, min(a + chunk, n), 0) for a in range(0, n, chunk)], None
    for a, b, size in spans:
        h, y = hidden[a:b], labels[a:b]
        valid = (y != ignore_index).float()
        rows_all = torch.arange(b - a, device=hidden.device)
        yv = y.clamp(min=0).long()
        z = h @ weight.t()  # the logits in the head's dtype
        if scale != 1.0 or softcap:
            z = z.float()
            if scale != 1.0:
                z.mul_(scale)
            if softcap:
                t = z.div_(softcap).tanh_()  # z = cap * tanh(raw / cap); t kept for the chain rule's 1 - t^2
                z = t * softcap
        # log-probabilities in float32, which become p and then the gradient in place: log_softmax casts the logits
        # itself (where PyTorch's kernel reads the head's dtype as float32, no float32 copy of them is made) and is
        # fused (z - logsumexp(z) would round the log-sum to the logits' scale)
        z = torch.log_softmax(z, dim=1, dtype=torch.float32)
        ce = ce - (z[rows_all, yv] * valid).sum()
        factor = valid
        if plan is not None:
            rows, tokens, keep = chunk_pairs(plan, labels, a, b, size)
            logp_c = z[rows, tokens]
            one_minus = -torch.expm1(logp_c)  # 1 - p without float32's cancellation near p = 1
            weight_c = keep.float() * valid[rows]
            ul = ul - (torch.log(one_minus.clamp(min=EPS)) * weight_c).sum()
            live = (weight_c > 0) & (one_minus > EPS)  # a clamped candidate: its loss, no gradient (as autograd through clamp)
            p_c = logp_c.exp()
            # r = p / (1 - p) and its row sums S in float64 (sparse, cheap): a candidate the model is nearly sure of has
            # r ~ 1e3, and its own entry below needs S - r, which float32 would leave with r's rounding
            r = torch.where(live, p_c.double() / one_minus.clamp(min=EPS).double(), 0.0)
            total = torch.zeros(b - a, dtype=torch.float64, device=hidden.device).index_add_(0, rows, r)
            factor = valid * (1.0 - alpha * total).float()
        dz = z.exp_()  # p, in place
        # d/dz = p (1 - alpha S) - onehot(y) + alpha r on the trained positions, S = sum r over the row's candidates
        dz.mul_(factor.unsqueeze(1))
        if plan is not None:
            # a candidate's own entry, p (1 - alpha S) + alpha r, written as p (1 + alpha - alpha (S - r)) (r (1 - p) = p):
            # the two ~alpha r terms cancel in closed form, not in float32
            own = torch.where(live, 1.0 + alpha - alpha * (total[rows] - r), 1.0 - alpha * total[rows])
            dz[rows, tokens] = (p_c.double() * own).float() * valid[rows]
        dz.index_put_((rows_all, yv), -valid, accumulate=True)
        if softcap:
            dz.mul_(t.mul_(t).neg_().add_(1.0))
        if scale != 1.0:
            dz.mul_(scale)
        grad_h[a:b] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
        if need_w:
            grad_w += dz.t() @ h.float()
    return grad_h, grad_w.to(weight.dtype), ce, ul


def head_loss(hidden, weight, labels, context, segment, *, alpha: float, chunk: int = 512, softcap: float | None = None,
              ignore_index: int = -100, exempt=None, scale: float = 1.0, candidates: str = "written"):
    """Summed cross-entropy plus `alpha` x summed unlikelihood over the trained positions, with the gradients for
    `hidden` and `weight` (the LM head's, vocab x d) made in the pass. Returns (loss, ce, ul): `loss` is the one to
    backpropagate (divide it by the trained tokens, or by the trainer's `num_items_in_batch`, as a mean loss is); `ce`
    and `ul` are its parts, detached, for the logs. alpha = 0 is plain cross-entropy (no candidates are built). `exempt`:
    token ids never penalised (see the module docstring). `scale`: what the model multiplies the head's output by before
    any cap (Granite's 1 / logits_scaling, Cohere's logit_scale, Falcon-H1's lm_head_multiplier). `candidates`: `written`
    (the paper's: the tokens the sample wrote) or `continuations` (the tokens that followed earlier occurrences of the
    current token; see the module docstring)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or context.shape != labels.shape or segment.shape != labels.shape:
        raise ValueError(f"head_loss takes flat positions: hidden (N, d), labels/context/segment (N,); got hidden "
                         f"{tuple(hidden.shape)}, labels {tuple(labels.shape)}, context {tuple(context.shape)}, segment {tuple(segment.shape)}")
    if chunk < 1:
        raise ValueError(f"head_loss chunk must be >= 1, got {chunk}")
    if candidates not in PLANS:
        raise ValueError(f"training.unlikelihood_candidates must be one of {', '.join(PLANS)}, got {candidates!r}")
    import torch

    if not torch.is_tensor(exempt):  # a list made into a device tensor is a host sync: attach_unlikelihood hands a tensor
        exempt = torch.as_tensor(list(exempt) if exempt is not None else [], dtype=torch.long)
    exempt = exempt.to(hidden.device, torch.long).reshape(-1)
    return _HeadLoss.get().apply(hidden, weight, labels, context, segment, float(alpha), int(chunk), softcap, int(ignore_index), exempt, float(scale), candidates)


def flat_positions(input_ids, labels, position_ids=None, ignore_index: int = -100, shifted: bool = False):
    """(labels, context, segment) for `head_loss` from a causal LM batch: (B, T) `input_ids` and `labels` as the model
    takes them (not yet shifted: the hidden state at t predicts labels[t + 1]). Each row is one sample, or for a packed
    row (`position_ids` restarting at 0) one sample per restart; a row's last position has no next token and gets
    `ignore_index`, as does the last position of each packed sample (its next token is the next sample's first).
    `shifted=True`: `labels` are already each position's next-token target (B, T)."""
    import torch

    batch, length = input_ids.shape
    if shifted:
        targets = labels.clone()
    else:
        targets = torch.full_like(labels, ignore_index)
        targets[:, :-1] = labels[:, 1:]
    if position_ids is not None and position_ids.dim() == 3:
        position_ids = position_ids[0]
    if position_ids is not None and position_ids.shape[-1] == length:
        starts = position_ids.reshape(-1, length).expand(batch, length) == 0
    else:
        starts = torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device)
    starts = starts.clone()
    starts[:, 0] = True
    ends_sample = torch.zeros_like(starts)
    ends_sample[:, :-1] = starts[:, 1:]  # the next position starts another sample: nothing of this one to predict
    targets = targets.masked_fill(ends_sample, ignore_index)
    segment = starts.reshape(-1).long().cumsum(0) - 1
    return targets.reshape(-1), input_ids.reshape(-1), segment


LOGIT_SCALES = (("logits_scaling", True), ("logit_scale", False), ("lm_head_multiplier", False))
"""Config keys of models that scale the head's output before the loss (Granite divides by `logits_scaling`; Cohere
multiplies by `logit_scale`, Falcon-H1 by `lm_head_multiplier`): (key, divides)."""


def logit_scale(config) -> float:
    """What `config`'s model multiplies its head's output by (1.0 for most; see LOGIT_SCALES)."""
    scale = 1.0
    for key, divides in LOGIT_SCALES:
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            scale = scale / value if divides else scale * value
    return scale


def default_chunk(vocab: int) -> int:
    """Positions a chunk: ~2^27 logits (Gemma's 262,144-token vocabulary: 512 rows; a 32k one: 4,096). A chunk holds its
    logits once in the head's dtype and twice in float32 for a moment (the raw logits and their log-probabilities), then
    one float32 tensor that becomes the gradient and its copy in the head's dtype: ~1.3 GiB at bf16 (2^27 x 10 bytes)."""
    return max(16, min(4096, (1 << 27) // vocab))


def unlikelihood_exempt(tok, stop_token_ids=()) -> list[int]:
    """Token ids `training.unlikelihood_alpha` never penalises: the tokenizer's special tokens and the run's stop tokens
    (an end-of-turn an earlier turn wrote must stay a token the next turn may end with). Stage 3 (its timed steps) and
    stage 4 both take them from here."""
    return sorted({int(i) for i in (tok.all_special_ids or [])} | {int(i) for i in (stop_token_ids or [])})


def attach_unlikelihood(model, alpha: float, chunk: int | None = None, exempt=(), candidates: str = "written"):
    """Make `model` (a PEFT model or a plain causal LM) train on cross-entropy plus `alpha` x token-level unlikelihood.
    Returns (compute_loss_func, handles): pass the first to the Trainer (its `take_parts()` gives the cross-entropy and
    unlikelihood parts of the loss since the last call, each per trained token) (`Trainer(compute_loss_func=...)`, which then
    takes `labels` out of the batch and hands them to it with the step's `num_items_in_batch`); `handle.remove()` takes
    the hooks off. `exempt`: token ids never penalised (the tokenizer's special tokens and the run's stop tokens).
    `candidates`: which tokens are penalised (training.unlikelihood_candidates: `written` or `continuations`). While training, a pre-hook on the causal LM remembers the batch's token ids and positions and asks for
    the last position's logits only (`logits_to_keep=1`: the head runs here, chunked, not over every position), and a hook
    on its decoder keeps the final hidden states (after the last norm) for the loss. Everything else in the forward (PEFT,
    Liger's kernels, NEFTune's hooks, compiled layers) runs as it would. In eval mode the hooks stand aside.

    The LM head must be a plain linear without LoRA and without bias (every causal LM this project trains: LoRA targets
    the decoder's projections); a model whose head is otherwise is refused in one line."""
    import torch

    if candidates not in PLANS:
        raise ValueError(f"training.unlikelihood_candidates must be one of {', '.join(PLANS)}, got {candidates!r}")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is inner:  # Llama-4 text: get_decoder() is the causal LM itself; its decoder is `.model`
        decoder = getattr(inner, "model", None)
    if decoder is None or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(f"training.unlikelihood_alpha needs a causal LM whose head is a plain linear layer without bias and a "
                         f"decoder it can read the last hidden states of; {type(inner).__name__} has head "
                         f"{type(head).__name__} (set training.unlikelihood_alpha to null to train without it)")
    if chunk is None:
        chunk = default_chunk(head.weight.shape[0])
    text_cfg = getattr(inner.config, "get_text_config", lambda: inner.config)()
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    scale = logit_scale(text_cfg)
    vocab = head.weight.shape[0]
    exempt = sorted({int(i) for i in exempt if 0 <= int(i) < vocab})  # an id the head cannot produce needs no exemption
    exempt_on: dict = {}  # device -> the ids as a tensor there, made once (each copy from the host is a sync)
    seen: dict = {}

    def remember_inputs(module, args, kwargs):
        if not module.training:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("training.unlikelihood_alpha needs input_ids in the training batch (it scores the tokens already "
                             "written); this batch has inputs_embeds only")
        seen.clear()
        seen.update(input_ids=ids, position_ids=kwargs.get("position_ids"))
        keep = kwargs.get("logits_to_keep")
        if torch.is_tensor(keep) and keep.dim() == 1:
            # the packing collator's head-only-where-trained batch (`keep_logits`): the Trainer hands this loss its
            # shifted targets at those positions; the model's own loss on them (`shift_labels`) is not asked for
            seen["keep"] = keep
        rest = {k: v for k, v in kwargs.items() if k != "shift_labels"}
        return args, {**rest, "logits_to_keep": 1}

    def keep_hidden(module, args, output):
        if module.training:
            hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
            if hidden is None:
                raise ValueError(f"training.unlikelihood_alpha: {type(module).__name__} returned no last_hidden_state to score "
                                 "(set training.unlikelihood_alpha to null for this model)")
            seen["hidden"] = hidden
        return None

    def loss(outputs, labels, num_items_in_batch=None):
        hidden = seen.pop("hidden")
        ids, keep = seen["input_ids"], seen.get("keep")
        if keep is not None:  # targets at the kept positions, already shifted: put them back in place
            targets = torch.full(ids.shape, -100, dtype=labels.dtype, device=labels.device)
            targets[:, keep.to(labels.device)] = labels
            flat_labels, context, segment = flat_positions(ids, targets, seen.get("position_ids"), shifted=True)
        else:
            flat_labels, context, segment = flat_positions(ids, labels, seen.get("position_ids"))
        total, ce, ul = head_loss(hidden.reshape(-1, hidden.shape[-1]), head.weight, flat_labels, context, segment,
                                  alpha=alpha, chunk=chunk, softcap=softcap, scale=scale, candidates=candidates,
                                  exempt=exempt_on.get(hidden.device) if hidden.device in exempt_on else
                                  exempt_on.setdefault(hidden.device, torch.tensor(exempt, dtype=torch.long, device=hidden.device)))
        count = num_items_in_batch if num_items_in_batch is not None else (flat_labels != -100).sum()
        count = torch.as_tensor(count, device=total.device, dtype=total.dtype).clamp(min=1)
        # the parts, summed over the step's micro-batches on the device (no sync): `take_parts` reads and clears them
        parts["ce"] = parts.get("ce", 0) + ce / count
        parts["ul"] = parts.get("ul", 0) + ul / count
        return total / count

    parts: dict = {}

    def take_parts() -> dict:
        """The cross-entropy and unlikelihood parts of the loss since the last call, as floats (a sync: once a step); while
        `loss.held_parts` is set, those instead (a log made a step late reads its own step's parts)."""
        source = parts if loss.held_parts is None else loss.held_parts
        out = {k: float(v) for k, v in source.items()}
        source.clear()
        return out

    def set_aside_parts() -> dict:
        """The parts since the last call, taken out unread (device tensors: no sync), for a log made later: stage 4's
        deferred loss read (tasks/train.py `deferred_loss_read`) sets them as `loss.held_parts` while it logs that step."""
        out = dict(parts)
        parts.clear()
        return out

    loss.take_parts = take_parts
    loss.set_aside_parts = set_aside_parts
    loss.held_parts = None

    return loss, [inner.register_forward_pre_hook(remember_inputs, with_kwargs=True),
                  decoder.register_forward_hook(keep_hidden)]
