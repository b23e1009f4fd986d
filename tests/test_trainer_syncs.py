"""Issue 19, the Trainer's share of a step: stage 4's loop (tasks/train.py) and the probe's read no device value back to
the host per micro-batch for their bookkeeping. transformers' `_track_num_input_tokens` turns the packed row's token
count, a host integer, into a device tensor and `.item()`s it after every backward (a drain of the CUDA queue, then the
next forward starts from an idle GPU), and `floating_point_ops` walks every parameter of the model per micro-batch
(~7 ms of host time on 32 layers). The counts are the same numbers, made on the host.

Counted on CPU with a dispatch mode: a `.item()` there is the same call that waits for the GPU on CUDA."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tasks.engine.build import bookkeeping_trainer


class ReadBacks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
            self.n += 1
        return func(*args, **(kwargs or {}))


def tiny_trainer(tmp_path, tokens_seen="all"):
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    cfg = AutoConfig.for_model("mistral", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", include_num_input_tokens_seen=tokens_seen)
    return bookkeeping_trainer()(model=model, args=args), model


def packed_inputs(n=37):
    ids = torch.randint(3, 64, (1, n))
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(n)[None]}


def test_token_count_of_a_packed_row_is_made_on_the_host(tmp_path):
    trainer, _ = tiny_trainer(tmp_path)
    inputs = packed_inputs()
    with ReadBacks() as reads:
        trainer._track_num_input_tokens(inputs)
        trainer._track_num_input_tokens(inputs)
    assert reads.n == 0  # transformers' own: one `.item()` per call
    assert trainer.state.num_input_tokens_seen == 2 * 37
    assert isinstance(trainer.state.num_input_tokens_seen, int)  # trainer_state.json writes it


def test_non_padding_count_keeps_transformers_path(tmp_path):
    """Padded micro-batches count non-padding tokens, a device reduction: that path stays transformers' own."""
    trainer, _ = tiny_trainer(tmp_path, tokens_seen="non_padding")
    inputs = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    trainer._track_num_input_tokens(inputs)
    assert trainer.state.num_input_tokens_seen == 2


def test_flops_count_walks_the_parameters_once(tmp_path, monkeypatch):
    from transformers import Trainer

    trainer, model = tiny_trainer(tmp_path)
    inputs = packed_inputs()
    expected = Trainer.floating_point_ops(trainer, inputs)
    walks = []
    original = type(model).num_parameters
    monkeypatch.setattr(type(model), "num_parameters", lambda self, *a, **k: walks.append(1) or original(self, *a, **k))
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [expected] * 3
    assert len(walks) <= 1
