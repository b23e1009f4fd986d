"""Compatibility path: the fast engine's pieces live in tasks/engine/ (fastpath.py: packing, varlen attention,
Liger; recompute.py: recompute placement). Existing `from tasks.fastpath import ...` lines keep working."""

from .engine.fastpath import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    PackedDataset,
    PaddingFreeCollator,
    fast_attn_implementation,
    liger_available,
    pack_by_tokens,
    packed_hf_dataset,
    prepare_fast_model,
    register_varlen_attention,
    varlen_attention_forward,
)
from .engine.recompute import PartialRecomputeCallback, checkpointed_layers, recompute_free_layers, set_recompute_free_layers

__all__ = [
    "IGNORE_INDEX", "VARLEN_ATTENTION", "PackedDataset", "PaddingFreeCollator", "PartialRecomputeCallback", "checkpointed_layers",
    "fast_attn_implementation", "liger_available", "pack_by_tokens", "packed_hf_dataset", "prepare_fast_model",
    "recompute_free_layers", "register_varlen_attention", "set_recompute_free_layers", "varlen_attention_forward",
]
