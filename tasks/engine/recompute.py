"""Recompute placement: which decoder layers gradient checkpointing recomputes, and how many memory lets skip it.

Each layer freed from recompute saves about a third of its step time (forward, recompute, backward -> forward,
backward); the probe (tasks/probe.py) measures two peaks and `recompute_free_layers` turns them into a count.
"""

from __future__ import annotations

import torch


def checkpointed_layers(model) -> list[torch.nn.Module]:
    """The decoder layers that gradient checkpointing can toggle (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_recompute_free_layers(model, n_free: int) -> int:
    """Keep the activations of the last `n_free` decoder layers (no recompute); checkpoint the rest.

    Call after gradient checkpointing is enabled (Trainer enables it at the start of `train`; use
    PartialRecomputeCallback). Returns how many layers run without recompute.
    """
    layers = checkpointed_layers(model)
    n_free = max(0, min(n_free, len(layers)))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < len(layers) - n_free
    return n_free


def recompute_free_layers(peak_full_gb: float, per_layer_gb: float, budget_gb: float, n_layers: int,
                          margin_gb: float = 0.5) -> int:
    """How many layers can skip recompute within `budget_gb`, from two measured numbers.

    `peak_full_gb` is a measured peak with some layers (possibly none) freed; `per_layer_gb` what each further
    freed layer adds. Measure the latter as the difference between two runs that both free a few layers (4 and
    8 in bench/gpu_bench.py): against the fully checkpointed peak, part of the kept activations hides under the
    transient of recomputing a layer, and the estimate comes out about half the real cost. Each layer freed
    from recompute saves about a third of its step time (forward, recompute, backward -> forward, backward).
    """
    if per_layer_gb <= 0:
        return n_layers
    room = budget_gb - margin_gb - peak_full_gb
    return max(0, min(n_layers, int(room // per_layer_gb)))


try:
    from transformers import TrainerCallback as _TrainerCallback
except Exception:  # transformers missing: the callback is unusable, the rest of the module still imports
    _TrainerCallback = object


class PartialRecomputeCallback(_TrainerCallback):
    """Trainer callback: after Trainer turns checkpointing on, free the last `n_free` layers from recompute."""

    def __init__(self, n_free: int):
        self.n_free = n_free

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and args.gradient_checkpointing:
            set_recompute_free_layers(model, self.n_free)
