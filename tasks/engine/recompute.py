"""Recompute placement: which decoder layers gradient checkpointing recomputes, how many memory lets skip it, and
whether the checkpointed layers' inputs wait for the backward on the GPU or in host memory.

Each layer freed from recompute saves about a third of its step time (forward, recompute, backward -> forward,
backward); the probe (tasks/probe.py) measures two peaks and `recompute_free_layers` turns them into a count.
Offloading (`offload_checkpoints`) goes the other way: it spends some speed to take the inputs that full recompute
keeps (one per layer) off the GPU. The two exclude each other: a layer without recompute would be offloaded whole.
"""

from __future__ import annotations

import torch

OFFLOAD_NOTE = "checkpointed activations offloaded to host memory"  # how the probe's and stage 4's logs say it


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
    if n_free and getattr(model, "activation_offload", None) is not None:
        raise ValueError(f"{n_free} layers without recompute on a model whose activations are offloaded: every saved tensor of "
                         "those layers would be copied to host memory and back; choose one (the probe never picks both)")
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


def offload_checkpoints(model, **manager_kwargs):
    """Hold what the model saves for the backward in pinned host memory instead of on the GPU: TRL's maintained
    activation offloading (`trl.models.get_act_offloading_ctx_manager`, torchtune's design: copies on a side stream
    that overlap the compute, prefetched in the backward; the LM head kept on the GPU, as its output is needed at once).

    Under non-reentrant checkpointing (build_model's) the manager sees only each checkpointed layer's inputs: the
    layer's internals are saved by checkpoint's own hooks, which nest inside. The manager is entered around every
    forward of `model` (a forward pre-hook, and a forward hook that runs even when the forward raises: how TRL hooks
    its own no-op manager around the head), so whatever calls the model, the probe's Trainer or stage 4's, runs
    offloaded; the backward unpacks on its own. CUDA only: TRL reads the accelerator, and a CPU-only torch has none.
    Returns the manager (also `model.activation_offload`)."""
    from trl.models import get_act_offloading_ctx_manager

    manager = get_act_offloading_ctx_manager(model, **manager_kwargs)
    model.register_forward_pre_hook(lambda *args: manager.__enter__())
    model.register_forward_hook(lambda *args: manager.__exit__(None, None, None), always_call=True)
    model.activation_offload = manager
    return manager


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
