"""What each engine trains on: the dataset view and the collator.

padded (the seed recipe): examples batched `micro_batch_size` at a time and right-padded. fast/fused: examples
packed by tokens into rows of at most micro_batch x max_length real tokens, one row per forward, no
cross-sample attention (tasks/engine/fastpath.py).
"""

from __future__ import annotations

import hashlib
import math


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


def training_dataset(engine: str, train_ds, micro_batch_size: int, max_length: int, seed: int):
    """(dataset, per-device batch size) for the engine (see the module docstring)."""
    if not is_padding_free(engine):
        return train_ds, micro_batch_size
    from .fastpath import PackedDataset, pack_by_tokens

    lengths = [len(x) for x in train_ds["input_ids"]]
    packs = pack_by_tokens(lengths, micro_batch_size * max_length, seed)
    return PackedDataset(train_ds, packs), 1


def collator_for(engine: str, pad_id: int):
    if is_padding_free(engine):
        from .fastpath import PaddingFreeCollator

        return PaddingFreeCollator()
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
