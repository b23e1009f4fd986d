"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve
Instruction Finetuning", arXiv:2310.05914; `training.neftune_noise_alpha`).

Each token's embedding gets noise drawn from U(-m, m) with m = alpha / sqrt(L * d), L the length of the sample the
token belongs to and d the embedding width. transformers' own hook (`TrainingArguments.neftune_noise_alpha`) takes L
from the tensor's shape, which is right for one unpadded sample a row and wrong for what stage 4 trains on:

- a packed row (the fast and fused engines: one (1, T) row of whole samples, positions restarting at 0 for each) would
  get the noise of one sample T tokens long, sqrt(T / L) times too weak (x9 for 8,192-token packs of 100-token chats);
- a padded batch would count its padding.

So L comes from the forward's own inputs here: the segments of `position_ids` (a packed row) or the row's real tokens
(`attention_mask`), else the row length. A model that scales its embeddings inside the embedding module (Gemma:
`embed_scale` = sqrt(hidden size)) gets the noise scaled with them, as if it were added to the looked-up vectors before
the scale: the paper's noise is relative to the embedding table, and on Gemma-3-270M the unscaled noise would be 25x
weaker than on a model without the scale. Evaluation and generation run in eval mode and get no noise.
"""

from __future__ import annotations

from typing import Any

INPUT_KEYS = ("position_ids", "attention_mask")


def sample_lengths(shape: tuple[int, int], position_ids: Any = None, attention_mask: Any = None, device: Any = None):
    """(B, T) float tensor: for every token, the length of the sample it belongs to. Packed rows (positions restart at
    0 where a sample starts) are split at the restarts; a padded row counts its attention mask; else the row's length.
    No host-device sync (segment sizes are summed on the device)."""
    import torch

    batch, length = shape
    if position_ids is not None and position_ids.dim() == 3:
        position_ids = position_ids[0]  # multimodal rotary positions (3, B, T): the text positions' restarts are the first's
    if position_ids is not None and position_ids.shape[-1] == length:
        pos = position_ids.reshape(-1, length).expand(batch, length).to(device)
        starts = pos == 0
        starts[:, 0] = True  # a row that starts mid-sample (a truncated pack) still opens a segment
        segment = starts.long().cumsum(1) - 1  # (B, T): which sample of its row each token is in
        flat = (segment + torch.arange(batch, device=pos.device).unsqueeze(1) * length).reshape(-1)
        sizes = torch.zeros(batch * length, dtype=torch.float32, device=pos.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        lengths = sizes[flat].reshape(batch, length)
    else:
        lengths = torch.full((batch, length), float(length), device=device)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == (batch, length):
        # a padded row: its real tokens only (with positions too, right padding continues them past the sample)
        real = attention_mask.to(device=device, dtype=torch.float32).sum(1, keepdim=True).clamp(min=1)
        lengths = torch.minimum(lengths, real.expand(batch, length))
    return lengths


def add_embedding_noise(model, alpha: float) -> list:
    """Register NEFTune on `model`'s input embeddings (a PEFT model or a plain causal LM); returns the hook handles
    (`handle.remove()` takes it off). The forward's `position_ids`/`attention_mask` are read by a pre-hook on the model
    that owns the embeddings, so the noise knows each token's sample; only in training mode."""
    import torch

    if alpha <= 0:
        return []
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = inner.get_input_embeddings()
    seen: dict[str, Any] = {}

    def remember_inputs(module, args, kwargs):
        seen.clear()
        seen.update({k: kwargs.get(k) for k in INPUT_KEYS})
        return None

    def add_noise(module, inputs, output):
        if not module.training or output.dim() != 3:
            return output
        batch, length, width = output.shape
        lengths = sample_lengths((batch, length), seen.get("position_ids"), seen.get("attention_mask"), output.device)
        scale = getattr(module, "embed_scale", None)
        magnitude = alpha / torch.sqrt(lengths * width)
        if scale is not None:
            magnitude = magnitude * torch.as_tensor(scale, device=output.device, dtype=torch.float32)
        noise = torch.rand_like(output, dtype=torch.float32).mul_(2).sub_(1).mul_(magnitude.unsqueeze(-1))
        return output + noise.to(output.dtype)

    return [inner.register_forward_pre_hook(remember_inputs, with_kwargs=True),
            embeddings.register_forward_hook(add_noise)]
