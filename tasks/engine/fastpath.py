"""The fast training engine's pieces (issue 6): padding-free batches, varlen attention, fused kernels.

Each piece is a small pure function or class that the training stage imports; none of them needs a GPU to
import, and each degrades to the plain recipe's behaviour where its accelerated path is missing:

    from tasks.engine.fastpath import PaddingFreeCollator, fast_attn_implementation, pack_by_tokens, prepare_fast_model

    attn = fast_attn_implementation("cuda")              # "fastpath_varlen" on CUDA, "sdpa" elsewhere
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=attn)
    model = prepare_fast_model(model)                     # Liger RMSNorm/SwiGLU/RoPE/fused CE on CUDA
    packs = pack_by_tokens([len(r["input_ids"]) for r in rows], max_tokens=4 * 2048, seed=42)
    dataset = packed_hf_dataset(rows, packs)              # one row = one micro-batch of whole samples
    trainer = SFTTrainer(..., train_dataset=dataset, data_collator=PaddingFreeCollator(),
                         args=SFTConfig(per_device_train_batch_size=1, dataset_kwargs={"skip_prepare_dataset": True}))

Why padding-free: with real instruction data (median ~500 tokens, long tail to 2,048) a padded micro-batch of 4
is mostly padding, and every padded position costs a full forward and backward. Packing whole samples into one
row under a token budget (micro_batch x max_length) keeps the tokens per optimizer step of the seed recipe
while computing on real tokens only. Each sample keeps its own positions (0..n-1) and attends only to itself:
the collator hands the model `cu_seq_lens_*`, and the varlen attention runs flash attention per sample in
one kernel launch, with no mask and no cross-sample work (`torch.nn.attention.varlen`, torch >= 2.10).

Measured on one H200 (docs/BENCHMARKS.md): padding-free + varlen takes mixed-length data from 2,149 to 7,789
real tokens/s, Liger adds 11-17%, and freeing layers from recompute adds up to 47% where memory allows
(tasks/engine/recompute.py sizes it: 4 layers on a 16 GB card, all 32 on an 80 GB one).
"""

from __future__ import annotations

import bisect
import inspect
import random
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

VARLEN_ATTENTION = "fastpath_varlen"
"""Name under which the varlen attention is registered with transformers' AttentionInterface."""

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------


def _flatten_features(features: Sequence[Any]) -> list[dict]:
    """Accept samples, packs given as lists of samples (PackedDataset), or packs given as one row whose
    `input_ids`/`labels` are lists of per-sample lists (packed_hf_dataset)."""
    flat: list[dict] = []
    for f in features:
        if isinstance(f, dict) and len(f["input_ids"]) and isinstance(f["input_ids"][0], (list, tuple)):
            labels = f.get("labels") or f["input_ids"]
            flat.extend({"input_ids": x, "labels": y} for x, y in zip(f["input_ids"], labels))
        elif isinstance(f, dict):
            flat.append(f)
        elif isinstance(f, (list, tuple)):
            flat.extend(_flatten_features(f))
        else:
            raise TypeError(f"PaddingFreeCollator got a {type(f).__name__}; expected dicts with input_ids/labels or lists of them")
    return flat


class PaddingFreeCollator:
    """Concatenate whole samples into one row, (1, T), with per-sample positions and no cross-sample loss.

    Returns `input_ids`, `labels`, `position_ids` (restarting at 0 for each sample), and the varlen boundaries
    `cu_seq_lens_q`/`cu_seq_lens_k` (int32, T+1 style cumulative lengths) with `max_length_q`/`max_length_k`,
    the names transformers forwards to the attention function, and `use_cache=False`: a model that builds a KV
    cache skips transformers' packed-sequence detection, and sdpa would then attend across samples. The first
    label of every sample is set to -100:
    the causal shift would otherwise train the last token of one sample to predict the first of the next.
    Labels already carry -100 outside assistant turns (the data stage masks them); a sample without labels is
    trained on all its tokens.

    `tokens_seen` counts the real tokens collated so far (benchmarks read it; padding-free has no padding).

    `keep_logits=True` (for a model whose forward takes `logits_to_keep`, `accepts_logits_to_keep`): the LM head runs
    only where a token is trained on — `logits_to_keep` lists the positions whose next token is a label, and
    `shift_labels` (also passed as `labels`, which makes transformers compute the loss) holds those targets. The loss
    and its gradients are the same; the prompt and system positions skip the (tokens x vocabulary) head, a real share
    of a step with a 128k-262k vocabulary (Gemma-3-270M on CPU: the head is ~60% of the FLOPs).

    `full_rows=(n, length)`: a pack of exactly n samples of `length` tokens each (rows that fill max_length: long
    documents, the full-length benchmark) goes as an (n, length) batch of plain causal rows instead of one packed row
    — the same attention and loss, but sdpa's kernel on rows where the packed row takes the varlen kernel and its
    copies (one H200, Mistral-7B shapes, the own loop: 11,264 against 10,579 tokens/s in one call, docs/BENCHMARKS.md
    "The split finished"). No position ids (every row starts at 0) and no cu_seq_lens; with `keep_logits`, the head runs
    on the positions any row trains on, each row's other kept positions labelled -100. Only for a model whose
    attention window, if any, holds a whole row (`collate.collator_for` checks): a window shorter than the row would
    need a mask, which costs more than the varlen kernel's window.
    """

    def __init__(self, max_tokens: int | None = None, keep_logits: bool = False, full_rows: tuple[int, int] | None = None):
        self.max_tokens = max_tokens
        self.keep_logits = keep_logits
        # one sample is one row either way (a pack of one goes packed, with no mask): rows only from 2 samples on
        self.full_rows = tuple(full_rows) if full_rows and int(full_rows[0]) > 1 else None
        self.tokens_seen = 0

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        samples = [s for s in _flatten_features(features) if len(s["input_ids"]) > 0]
        if not samples:
            raise ValueError("PaddingFreeCollator got no non-empty sample; drop empty rows in the data stage")
        if self.full_rows and len(samples) == self.full_rows[0] and all(len(x["input_ids"]) == self.full_rows[1] for x in samples):
            return self._rows(samples)
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        cu = [0]
        for i, s in enumerate(samples):
            x, y = _ids_and_labels(i, s)
            ids.extend(x)
            labels.extend(y)
            positions.extend(range(len(x)))
            cu.append(cu[-1] + len(x))
        if self.max_tokens is not None and cu[-1] > self.max_tokens:
            raise ValueError(f"a packed batch holds {cu[-1]} tokens, over max_tokens={self.max_tokens}; pack with pack_by_tokens")
        self.tokens_seen += cu[-1]
        cu_seq_lens = torch.tensor(cu, dtype=torch.int32)
        max_len = max(b - a for a, b in zip(cu, cu[1:]))
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_len,
            "max_length_k": max_len,
            "use_cache": False,
        }
        if self.keep_logits:
            shifted = labels[1:] + [IGNORE_INDEX]
            keep = [i for i, y in enumerate(shifted) if y != IGNORE_INDEX]
            if keep:  # a pack with nothing to train on keeps the plain path (its loss is not a number either way)
                targets = torch.tensor([[shifted[i] for i in keep]], dtype=torch.long)
                batch.update(logits_to_keep=torch.tensor(keep, dtype=torch.long), shift_labels=targets, labels=targets)
        return batch


    def _rows(self, samples: list[dict]) -> dict[str, Any]:
        """An (n, length) batch of whole samples, one a row (see `full_rows`)."""
        ids, labels = [], []
        for i, s in enumerate(samples):
            x, y = _ids_and_labels(i, s)  # the first label masked as in a packed row (a row's shift never reads it)
            ids.append(x)
            labels.append(y)
        if self.max_tokens is not None and len(ids) * len(ids[0]) > self.max_tokens:
            raise ValueError(f"a batch holds {len(ids) * len(ids[0])} tokens, over max_tokens={self.max_tokens}")
        self.tokens_seen += len(ids) * len(ids[0])
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long), "use_cache": False}
        if self.keep_logits:
            shifted = [y[1:] + [IGNORE_INDEX] for y in labels]
            keep = [j for j in range(len(ids[0])) if any(row[j] != IGNORE_INDEX for row in shifted)]
            if keep:
                targets = torch.tensor([[row[j] for j in keep] for row in shifted], dtype=torch.long)
                batch.update(logits_to_keep=torch.tensor(keep, dtype=torch.long), shift_labels=targets, labels=targets)
        return batch


def _ids_and_labels(i: int, sample: dict) -> tuple[list[int], list[int]]:
    """Sample i's token ids and labels (its ids where it has none), the first label masked: in a packed row the causal
    shift would otherwise train the last token of one sample to predict the first of the next."""
    x = list(sample["input_ids"])
    y = list(sample.get("labels", x))
    if len(y) != len(x):
        raise ValueError(f"sample {i} of the batch has {len(x)} input_ids but {len(y)} labels; they must match")
    y[0] = IGNORE_INDEX
    return x, y


def rows_fit_window(model, length: int) -> bool:
    """Whether plain causal rows of `length` tokens attend as the model does: no sliding window, or one that holds the
    whole row (Mistral-7B-v0.1's 4,096 at 2,048; not Gemma-3's 512-token local layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    config = getattr(config, "text_config", None) or config
    chunk = getattr(config, "attention_chunk_size", None) if "chunked_attention" in (getattr(config, "layer_types", None) or ()) else None
    if chunk and length > int(chunk):  # Llama-4's chunked layers: rows longer than a chunk need a chunk mask, as a window does
        return False
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return True
    return length <= int(window)


def accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes `logits_to_keep` (transformers' causal LMs, Liger's forwards)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def pack_by_tokens(lengths: list[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Group sample indices into micro-batches of at most `max_tokens` tokens (best-fit decreasing).

    Every index appears in exactly one pack. Packs come back in a seeded random order, so long and short samples
    are spread over the run rather than sorted; the samples inside a pack keep ascending index order. With
    `max_tokens = micro_batch x max_length` a pack holds at least as many tokens as the seed recipe's padded
    micro-batch does real tokens, so an optimizer step sees the same or more real tokens.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, over max_tokens={max_tokens} ({len(too_long)} such); "
                         "truncate or drop it in the data stage, or raise the budget")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)  # ties in length are broken at random, not by position in the file
    order.sort(key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, pack id), sorted: bisect finds the tightest pack that fits
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            left, p = free.pop(k)
            packs[p].append(i)
            bisect.insort(free, (left - n, p))
        else:
            packs.append([i])
            bisect.insort(free, (max_tokens - n, len(packs) - 1))
    for p in packs:
        p.sort()
    rng.shuffle(packs)
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose item `k` is the list of samples of pack `k` (feed it with batch size 1)."""

    def __init__(self, rows: Sequence[dict], packs: list[list[int]]):
        self.rows = rows
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> list[dict]:
        return [self.rows[i] for i in self.packs[k]]


def packed_hf_dataset(rows: Sequence[dict], packs: list[list[int]]):
    """A `datasets.Dataset` with one row per pack (`input_ids`/`labels` as lists of per-sample lists).

    TRL's SFTTrainer accepts only `datasets` datasets; pass it with `per_device_train_batch_size=1` and
    `dataset_kwargs={"skip_prepare_dataset": True}` (the rows are already tokenized and masked).
    """
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [[list(rows[i]["input_ids"]) for i in p] for p in packs],
        "labels": [[list(rows[i].get("labels", rows[i]["input_ids"])) for i in p] for p in packs],
    })


# --------------------------------------------------------------------------------------------------------
# Attention: flash varlen over the packed row, one launch, no mask
# --------------------------------------------------------------------------------------------------------


def _torch_varlen():
    """torch's varlen flash attention (torch >= 2.10) and how to ask it for causal/GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # 2.11+ vs 2.10
    return varlen_attn, causal, "enable_gqa" in params


_VARLEN = _torch_varlen()


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


def _segments_from_positions(position_ids: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """cu_seq_lens from packed position ids (one host sync): a sample starts at the row's start and wherever the
    positions restart at 0; None when the row holds a single sequence."""
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0, 1:] == 0).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    ends = torch.tensor([0, length], device=starts.device, dtype=starts.dtype)
    return torch.cat([ends[:1], starts, ends[1:]]).to(torch.int32)


def _attention_chunk(module: torch.nn.Module) -> int | None:
    """The chunk of a layer with chunked attention (Llama-4's RoPE layers: `config.layer_types[i] ==
    "chunked_attention"`, each token seeing only the tokens of its own `attention_chunk_size`-token chunk of the
    sequence, counted from the sequence's start); None for every other layer. Transformers builds that mask for a
    padded batch; a packed row or plain rows carry none, so the varlen attention applies the chunks itself."""
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if not types or index is None or index >= len(types) or types[index] != "chunked_attention":
        return None
    chunk = getattr(config, "attention_chunk_size", None)
    return int(chunk) if chunk else None


def _chunked_segments(cu: torch.Tensor, chunk: int, position_ids: torch.Tensor | None) -> torch.Tensor:
    """cu_seq_lens with every sample also cut where its position is a multiple of `chunk` (transformers counts chunks
    by position: `create_chunked_causal_mask`); from each sample's start where there are no position ids. Within a
    chunk attention is plain causal and no chunk sees another, so each chunk is a sample of its own (for the flash
    varlen kernel too)."""
    bounds = cu.tolist()
    if position_ids is not None and position_ids.shape[-1] == bounds[-1]:
        cuts = set(bounds) | set((position_ids[0] % chunk == 0).nonzero().flatten().tolist())
    else:
        cuts = set(bounds) | {b for a, e in zip(bounds, bounds[1:]) for b in range(a, e, chunk)}
    return torch.tensor(sorted(cuts), dtype=cu.dtype, device=cu.device)


def _temperature_per_sample(module: torch.nn.Module, query: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Queries of one packed row rescaled to each sample's own positions where the layer tunes its temperature by
    position (Llama-4's no-RoPE layers: `1 + attn_scale * log1p(floor((i + 1) / floor_scale))`). Transformers counts i
    along the row, not from each sample's start, so on a packed row longer than floor_scale (8,192 on Llama-4; packs
    hold micro_batch_size * max_length tokens) every sample past it had its queries scaled as if it sat that far into
    one long sequence. Unchanged for every other layer and for rows within floor_scale (all scales 1 there)."""
    if not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return query
    floor, length = float(module.floor_scale), query.shape[2]
    if length < floor:
        return query
    row = torch.arange(length, device=query.device)
    cu = cu.to(device=query.device, dtype=torch.long)
    own = row - torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])

    def scale(i):
        return torch.log1p(torch.floor((i.float() + 1.0) / floor)) * module.attn_scale + 1.0

    return (query.float() * (scale(own) / scale(row)).view(1, 1, -1, 1)).to(query.dtype)


def _rows_mask(position_ids: torch.Tensor | None, batch: int, length: int, sliding_window: int | None,
               device: torch.device, chunk: int | None = None) -> torch.Tensor | None:
    """(B, 1, T, T) mask of an unpadded batch: causal, within the window, within each sample of a row whose
    positions restart at 0, and within the token's chunk of its sample (`_attention_chunk`); None where plain causal
    attention is the same."""
    window = _window_mask(length, sliding_window, device)
    restarts = position_ids is not None and position_ids.shape == (batch, length) and bool((position_ids[:, 1:] == 0).any())
    chunked = chunk is not None and length > chunk
    if window is None and not restarts and not chunked:
        return None
    mask = (window if window is not None else _causal_mask(length, None, device)).expand(batch, length, length)
    if restarts:
        seg = torch.cat([torch.zeros_like(position_ids[:, :1]), (position_ids[:, 1:] == 0).long()], dim=1).cumsum(1)
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    if chunked:  # chunks by position, as transformers counts them: the row's position ids, else each row's own
        has_positions = position_ids is not None and position_ids.shape == (batch, length)
        pos = position_ids if has_positions else torch.arange(length, device=device).expand(batch, length)
        block = pos // chunk
        mask = mask & (block[:, :, None] == block[:, None, :])
    return mask[:, None]


def _causal_mask(n: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """(n, n) bool mask of one sequence: causal, within the window where it has one (`_window_mask`)."""
    window = _window_mask(n, sliding_window, device)
    if window is not None:
        return window
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None]


def _window_mask(n: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal mask of one sequence of n tokens, each seeing itself and the `sliding_window - 1` tokens before it
    (transformers' `sliding_window_overlay`); None where plain causal attention is the same (no window, or n within it)."""
    if sliding_window is None or n <= sliding_window:
        return None
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)


def _sdpa_per_sample(q, k, v, bounds, scaling, sliding_window, dropout):
    """Exact reference: one causal (windowed) sdpa call per sample; q/k/v (T, H, D) with kv already repeated."""
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        mask = _window_mask(b - a, sliding_window, q.device)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), attn_mask=mask, is_causal=mask is None,
            dropout_p=dropout, scale=scaling).transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention restricted to each packed sample (and to the layer's sliding window, where it has one);
    inputs (B, H, T, D), output (B, T, H, D).

    A padded batch (transformers built a 2D mask, window included) and one-token decoding go to transformers'
    sdpa path unchanged, so evaluation and generation behave exactly as with `attn_implementation="sdpa"`.
    Without a mask, a row is one or more whole samples (`cu_seq_lens_q`, or restarting `position_ids`): on CUDA
    torch's varlen flash kernel runs them in one launch, a sliding window as its `window_size`; elsewhere (CPU,
    attention dropout, a torch without the kernel or its window) one exact sdpa call per sample. A packed row never
    reaches a mask-less sdpa call: that attends across samples and ignores the window (Gemma-3's local layers trained
    so on an H200 started at loss 7.2 where the model's own was 2.6).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("softcap") is not None:  # build_model loads such a model (Gemma-2) with eager attention instead
        raise ValueError("the varlen attention has no logit softcapping; load this model with attn_implementation='eager'")
    # Inkling2 has no sdpa for these, so build_model's no-sdpa models reach here too: refused, not dropped.
    unsupported = [name for name in ("sinks", "position_bias") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"the varlen attention has no {' or '.join(unsupported)} (this model's attention needs them); "
                         "train it with training.engine=padded, or load it with attn_implementation='eager'")
    batch, _, length, _ = query.shape
    if kwargs.get("s_aux") is not None:  # attention sinks (GPT-OSS): neither flash varlen nor sdpa has them
        return _attention_with_sinks(module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                                     cu_seq_lens_q, position_ids, kwargs["s_aux"]), None
    if attention_mask is not None or length == 1 or key.shape[2] != length:
        # A padded batch, decoding, or a KV cache: transformers built the mask (`_varlen_mask` defers to sdpa's there).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    dropout = dropout if module.training else 0.0
    chunk = _attention_chunk(module)
    if batch != 1:  # an unpadded batch of rows (each one sequence, or samples packed by restarting positions)
        mask = _rows_mask(position_ids, batch, length, sliding_window, query.device, chunk)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)

    cu = cu_seq_lens_q if cu_seq_lens_q is not None else _segments_from_positions(position_ids, length)
    if cu is None:
        cu = torch.tensor([0, length], dtype=torch.int32)
    query = _temperature_per_sample(module, query, cu)
    if chunk is not None:
        cu, max_length_q = _chunked_segments(cu, chunk, position_ids), None
    n_rep = query.shape[1] // key.shape[1]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    cu = cu.to(device=q.device, dtype=torch.int32)
    if _VARLEN is not None and q.is_cuda and not dropout and (sliding_window is None or "window_size" in _VARLEN[1]):
        varlen_attn, causal, has_gqa = _VARLEN
        if sliding_window is not None:
            causal = {"window_size": (sliding_window - 1, 0)}  # flash's left window: keys i-(w-1)..i, transformers' w keys
        if not has_gqa:
            k, v = _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1)
        extra = {"enable_gqa": True} if has_gqa and n_rep > 1 else {}
        max_len = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len,
                          scale=scaling, **causal, **extra)
        return out.unsqueeze(0), None
    k, v = _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1)
    return _sdpa_per_sample(q, k, v, cu.tolist(), scaling, sliding_window, dropout).unsqueeze(0), None


def _attention_with_sinks(module, query, key, value, attention_mask, dropout, scaling, sliding_window, cu_seq_lens,
                          position_ids, sinks) -> torch.Tensor:
    """Attention with a learned sink logit per head (GPT-OSS's `s_aux`: one more column in each softmax, dropped after
    it, as transformers' gpt_oss eager attention computes it), in every batch form the varlen attention takes: a mask
    transformers built (padded batches, a KV cache), plain rows (causal, within the window), or one packed row, one
    sample at a time (each causal within the window). Eager arithmetic: correct, not fast (GPT-OSS trains on it where the
    varlen kernel would drop the sinks: on a tiny GPT-OSS, logits off by up to 5.7)."""
    dropout = dropout if module.training else 0.0
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep, 1), _repeat_kv(value, n_rep, 1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5

    def attend(q, k, v, mask):  # (B, H, T, D) each; mask bool (B|1, 1|H, T, S) or additive float
        weights = torch.matmul(q, k.transpose(2, 3)) * scaling
        if mask.dtype == torch.bool:
            weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + mask
        sink = sinks.reshape(1, -1, 1, 1).to(weights.dtype).expand(q.shape[0], -1, q.shape[-2], 1)
        logits = torch.cat([weights, sink], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training).to(v.dtype)
        return torch.matmul(probs, v).transpose(1, 2)  # (B, T, H, D)

    batch, _, length, _ = query.shape

    if attention_mask is not None or key.shape[2] != length:
        mask = attention_mask
        if mask is None:  # transformers skipped the mask, leaving sdpa's convention (`_ignore_causal_mask_sdpa`): one
            # token decoding sees every key; more tokens are a prefill into an empty cache (a static cache's unfilled
            # slots after them), causal from the first key (sdpa's top-left is_causal), not from the last
            j = torch.arange(key.shape[2], device=query.device)[None, :]
            mask = (j < key.shape[2]) if length == 1 else (j <= torch.arange(length, device=query.device)[:, None])
            mask = mask.expand(length, -1)[None, None]
        return attend(query, key, value, mask[..., : key.shape[2]])
    if batch != 1:
        mask = _rows_mask(position_ids, batch, length, sliding_window, query.device)
        return attend(query, key, value, mask if mask is not None else _causal_mask(length, sliding_window, query.device)[None, None])
    cu = cu_seq_lens if cu_seq_lens is not None else _segments_from_positions(position_ids, length)
    bounds = cu.tolist() if cu is not None else [0, length]
    outs = [attend(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], _causal_mask(b - a, sliding_window, query.device)[None, None])
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=1)


def _varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for padding-free rows without a KV cache (the attention keeps samples and windows apart itself, from
    cu_seq_lens or position ids); sdpa's mask for padded batches and whenever a cache is in play (a static cache's
    unfilled slots, tokens fed after a prefix: only the mask knows which keys count)."""
    from transformers.masking_utils import sdpa_mask

    no_cache = kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset") and not kwargs.get("kv_offset")
    if attention_mask is None and no_cache:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register the varlen attention (and its mask builder) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


def fast_attn_implementation(device_type: str) -> str:
    """The attn_implementation to load the model with for the fast path.

    CUDA: the registered varlen attention (flash kernel per sample, no mask; measured in bench/gpu_bench.py).
    Elsewhere: "sdpa", which also keeps packed samples apart (transformers builds a block-diagonal mask from the
    restarting position_ids) and is the faster choice on CPU, where a per-sample loop gains nothing.
    """
    if device_type == "cuda":
        return register_varlen_attention()
    return "sdpa"


# --------------------------------------------------------------------------------------------------------
# Fused kernels
# --------------------------------------------------------------------------------------------------------


def liger_available() -> bool:
    """True when liger-kernel imports (it needs triton and a GPU to run)."""
    try:
        import liger_kernel.transformers.monkey_patch  # noqa: F401  (the module that refuses an unsupported transformers)
    except Exception:  # ImportError, or triton failing to find a driver
        return False
    return True


def prepare_fast_model(model, *, use_liger: bool = True, fused_linear_cross_entropy: bool = True):
    """Swap in Liger's fused RMSNorm, SwiGLU, RoPE and linear+cross-entropy kernels where they apply.

    Returns the model unchanged when `use_liger` is off, the model is not on CUDA, liger-kernel is missing, or
    liger does not know the architecture. Call it on the base model before PEFT wraps it (a PeftModel is
    unwrapped). The fused cross-entropy never builds the (tokens x vocab) logits in training; TRL's SFTTrainer
    patches its own fused LM head over it, which has the same effect.
    """
    if not use_liger:
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        device = next(base.parameters()).device
    except StopIteration:
        return model
    if device.type != "cuda" or getattr(base, "_fastpath_liger", False) or not liger_available():
        return model
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(getattr(base.config, "model_type", None))
    if apply is None:
        return model
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                  fused_linear_cross_entropy=fused_linear_cross_entropy)
    accepted = inspect.signature(apply).parameters
    apply_kernel_patches(apply, model=base, **{k: v for k, v in wanted.items() if k in accepted})
    base._fastpath_liger = True
    return model


def apply_kernel_patches(apply, **kwargs) -> None:
    """Call a Liger `apply_liger_kernel_to_*` and remember what it replaced, for `kernel_patch_scope` to put back."""
    _PATCHED.append(_patchable_state())  # before the call: an apply that raises midway has patched globals already
    apply(**kwargs)


_PATCHED: list[dict] = []
"""What transformers' modules held before each `prepare_fast_model` call; `kernel_patch_scope` puts it back."""


def _patchable_state() -> dict:
    """What Liger's `apply_liger_kernel_to_*` may replace, keyed by owner: every loaded transformers modeling module's
    globals (RMSNorm/MLP classes, `apply_rotary_pos_emb`), its classes' `forward`, and torch's cross-entropy."""
    state: dict = {torch.nn.functional: {"cross_entropy": torch.nn.functional.cross_entropy}}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("transformers.models."):
            continue
        state[module] = dict(vars(module))
        for value in state[module].values():
            if isinstance(value, type) and value.__module__ == name and "forward" in vars(value):
                state[value] = {"forward": vars(value)["forward"]}
    return state


def _restore(state: dict) -> None:
    for owner, saved in state.items():
        now = vars(owner)
        for key, value in saved.items():
            if now.get(key) is not value:
                setattr(owner, key, value)


@contextmanager
def kernel_patch_scope() -> Iterator[None]:
    """Undo, on exit, what `prepare_fast_model` patched process-wide inside the scope.

    Liger swaps transformers' classes and functions module-wide, not only in the model it is given: a model loaded
    later in the same process (stage 5 after stage 4 in one flow run) would be built from Liger's RMSNorm/GEGLU and
    run Liger's RoPE. That model is not the one a user loads, and Liger's RoPE (0.8.5) rotates the wrong rows when a
    batch decodes one token after a norm that returns fresh memory (Gemma-3's and Qwen3's q/k norms: the size-1
    sequence dimension's stride is what its kernel steps rows by), so batched greedy answers on the GPU were garbage
    after the first token. Modules the patch swapped inside a model stay swapped (its RoPE, a module global, does not:
    nothing runs such a model after the scope).
    """
    depth = len(_PATCHED)
    try:
        yield
    finally:
        while len(_PATCHED) > depth:
            _restore(_PATCHED.pop())
