"""What each engine trains on: the dataset view and the collator.

padded (the seed recipe): examples batched `micro_batch_size` at a time and right-padded. fast/fused: examples
packed by tokens into rows of at most micro_batch x max_length real tokens, one row per forward, no
cross-sample attention (tasks/engine/fastpath.py).
"""

from __future__ import annotations

import hashlib
import math
import random


class PaddedCollator:
    """Right-pads a micro-batch to its longest example (the seed recipe's batches); labels pad with -100."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        n = int(math.ceil(n / self.multiple) * self.multiple)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def is_padding_free(engine: str) -> bool:
    """The engines that train on packed padding-free rows (everything but the seed recipe's `padded`)."""
    return engine != "padded"


def pack_rows(lengths: list[int], packing: str, micro_batch_size: int, max_length: int, seed: int) -> list[list[int]]:
    """One pass over the rows as packs (one per forward), in a seeded order. `full`: best-fit packs of up to
    micro x max_length tokens (TRL's and Axolotl's packing: a pack holds max_length / mean length times more
    conversations than a padded micro-batch). `matched`: exactly `micro` conversations a pack, the padded recipe's
    batch without its padding (so the learning rate means what it does there, and an out-of-memory retry at a smaller
    micro-batch and more accumulation keeps the conversations per step)."""
    from .fastpath import pack_by_tokens

    if packing == "full":
        return pack_by_tokens(lengths, micro_batch_size * max_length, seed)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return [sorted(order[i:i + micro_batch_size]) for i in range(0, len(order), micro_batch_size)]


class PassPacks:
    """`pack(lengths, seed) -> packs` for `PackedStream`: a pass over every row (`pack_rows` with the run's settings)
    is packed once per seed and kept. Stage 4 counts the first pass's packs for training.max_epochs' cap
    (`steps_per_pass`), trains on them (`PackedStream`) and describes a pack by them (`PackedStream.per_pack`): it
    packed that pass three times (~0.08 s each over 60k rows of demo-gpu's lengths). Other rows (a resume's unseen rows
    at another pack size) are packed as asked, each time."""

    def __init__(self, lengths: list[int], packing: str, micro_batch_size: int, max_length: int):
        self.lengths = lengths
        self.settings = {"packing": packing, "micro_batch_size": micro_batch_size, "max_length": max_length}
        self.passes: dict[int, list[list[int]]] = {}

    def __call__(self, lengths: list[int], seed: int) -> list[list[int]]:
        if lengths != self.lengths:
            return pack_rows(lengths, seed=seed, **self.settings)
        if seed not in self.passes:
            self.passes[seed] = pack_rows(lengths, seed=seed, **self.settings)
        return self.passes[seed]


class PackedStream:
    """The packed engines' training data: passes over the rows, each a seeded best-fit packing, concatenated
    until the run's step cap is covered, read in order (`sequential_sampler`).

    A run resumed from a checkpoint starts where that checkpoint's data position says (`position_after`): the pass
    and the rows of it already trained on. With the same pack size the rest of the pass is the original packs
    (resume is bit-identical while the pass is still the one first packed); with another (an out-of-memory retry
    halves the micro-batch) the rows not yet seen are packed anew. Either way every row is seen once per pass: no row repeats, none is skipped.
    """

    def __init__(self, rows, lengths: list[int], pack, seed: int, min_packs: int, start: dict | None = None):
        """`pack(lengths, seed) -> packs` packs one pass (`pack_rows` with the run's settings)."""
        self.rows, self.lengths, self.pack, self.seed = rows, lengths, pack, seed
        self.packs: list[list[int]] = []
        self.pass_of: list[int] = []
        self.start = start or {"pass": 0, "used": []}
        p, used = self.start["pass"], set(self.start["used"])
        while len(self.packs) < max(min_packs, 1) and lengths:
            packs = pack(lengths, seed + p)
            if used:
                n_done = self._packs_covering(packs, used)
                if n_done is not None:
                    packs = packs[n_done:]  # the same packing: continue it exactly
                else:
                    rest = [i for i in range(len(lengths)) if i not in used]
                    packs = [[rest[j] for j in pk] for pk in pack([lengths[i] for i in rest], seed + p)]
                used = set()
            self.packs += packs
            self.pass_of += [p] * len(packs)
            p += 1

    @staticmethod
    def _packs_covering(packs: list[list[int]], used: set[int]) -> int | None:
        """k when the first k packs hold exactly the `used` rows, else None."""
        seen = 0
        for k, pk in enumerate(packs):
            if seen == len(used):
                return k
            if not all(i in used for i in pk):
                return None
            seen += len(pk)
        return len(packs) if seen == len(used) else None

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> list[dict]:
        return [self.rows[i] for i in self.packs[k]]

    def position_after(self, n_packs: int) -> dict:
        """The data position after the first `n_packs` packs were trained on: {pass, used rows of that pass}."""
        if n_packs <= 0:
            return self.start
        last = min(n_packs, len(self.packs)) - 1
        p = self.pass_of[last]
        used = set(self.start["used"]) if p == self.start["pass"] else set()
        for k in range(last, -1, -1):
            if self.pass_of[k] != p:
                break
            used.update(self.packs[k])
        if len(used) == len(self.rows):
            return {"pass": p + 1, "used": []}
        return {"pass": p, "used": sorted(used)}

    def per_pack(self) -> tuple[float, float, int]:
        """(conversations, real tokens, largest tokens) of a pack, over one fresh pass: the same for a run and its
        resumes (the stream itself starts mid-pass after a resume)."""
        packs = self.pack(self.lengths, self.seed)
        sizes = [sum(self.lengths[i] for i in pk) for pk in packs]
        n = max(len(packs), 1)
        return sum(len(pk) for pk in packs) / n, sum(sizes) / n, max(sizes, default=0)


def training_dataset(engine: str, train_ds, micro_batch_size: int, max_length: int, seed: int, *, packing: str = "full",
                     min_packs: int = 1, start: dict | None = None, packs: PassPacks | None = None):
    """(dataset, per-device batch size) for the engine (see the module docstring): the rows themselves for the padded
    recipe, a `PackedStream` of at least `min_packs` packs (one per forward) for the padding-free engines, packed by
    `packs` where the caller has one (stage 4: the packings its max_epochs cap counted), else by a new one."""
    if not is_padding_free(engine):
        return train_ds, micro_batch_size
    packs = packs or PassPacks([len(x) for x in train_ds["input_ids"]], packing, micro_batch_size, max_length)
    return PackedStream(train_ds, packs.lengths, packs, seed, min_packs, start), 1


def steps_per_pass(engine: str, lengths: list[int], micro_batch_size: int, grad_accum: int, ranks: int, max_length: int, seed: int, *,
                   packing: str = "full", packs: PassPacks | None = None, partial: bool = False) -> float:
    """Optimizer steps that read the training rows once, as stage 4 deals them out: the padded recipe's Trainer takes
    ceil(rows / micro-batch) micro-batches a pass, shared by the ranks (the last rank's share filled up), `grad_accum`
    a step (the last step of a pass takes what is left; `partial`: that step counted by the micro-batches it takes, the
    pass in full steps, which is what a part of a pass reads: the Trainer starts each pass afresh); the packed engines
    read `grad_accum` packs a rank a step from a stream that runs on into the next pass, so a pass is its packs' share
    of a step, `partial` or not (the first pass's packs, from `packs` where given: the stream then trains on the packs
    counted here, not on a second packing of them)."""
    if not lengths:
        return 0.0
    if not is_padding_free(engine):
        per_rank = math.ceil(math.ceil(len(lengths) / micro_batch_size) / ranks)
        return per_rank / grad_accum if partial else float(math.ceil(per_rank / grad_accum))
    packs = packs or PassPacks(lengths, packing, micro_batch_size, max_length)
    return len(packs(lengths, seed)) / (grad_accum * ranks)


def collator_for(engine: str, pad_id: int, model=None, batch_shape: tuple[int, int] | None = None):
    """The engine's collator; given the model, packed rows run the LM head on trained positions only where its forward
    allows (`PaddingFreeCollator(keep_logits=...)`), and given the run's (micro_batch, max_length) too, a pack of
    micro_batch samples that each fill max_length goes as plain rows where the model's attention window holds a row
    (`PaddingFreeCollator(full_rows=...)`)."""
    if is_padding_free(engine):
        from .fastpath import PaddingFreeCollator, accepts_logits_to_keep, rows_fit_window

        rows = batch_shape if model is not None and batch_shape and rows_fit_window(model, batch_shape[1]) else None
        return PaddingFreeCollator(keep_logits=model is not None and accepts_logits_to_keep(model), full_rows=rows)
    return PaddedCollator(pad_id)


class BatchTrace:
    """Wraps a collator and fingerprints the first batches a rank trains on (several ranks: each must get its
    own shard of the data; written to work/ranks/rank-<r>.json)."""

    def __init__(self, collator, keep: int = 64):
        self.collator = collator
        self.keep = keep
        self.fingerprints: list[str] = []

    def __call__(self, features):
        batch = self.collator(features)
        if len(self.fingerprints) < self.keep:
            self.fingerprints.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:16])
        return batch
