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


def tiny_trainer(tmp_path, tokens_seen="all", data_collator=None):
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    cfg = AutoConfig.for_model("mistral", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", include_num_input_tokens_seen=tokens_seen)
    return bookkeeping_trainer()(model=model, args=args, data_collator=data_collator), model


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


def padded_rows(lengths=(5, 9, 3, 12, 7, 4, 10, 6)):
    from datasets import Dataset

    rows = [list(range(3, 3 + n)) for n in lengths]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def test_non_padding_count_of_a_padded_batch_is_made_on_the_host(tmp_path):
    """The padded engine counts non-padding tokens (`include_num_input_tokens_seen="non_padding"`): transformers sums
    the attention_mask on the device after the batch was moved there and `.item()`s it. The collator counts it while
    the mask is still on the host; the model never sees the count."""
    from tasks.engine.build import NON_PADDING_TOKENS
    from tasks.engine.collate import PaddedCollator

    trainer, _ = tiny_trainer(tmp_path, tokens_seen="non_padding", data_collator=PaddedCollator(pad_id=0))
    batch = trainer.data_collator([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
    assert batch[NON_PADDING_TOKENS] == 5 and NON_PADDING_TOKENS not in trainer._prepare_inputs(batch)
    with ReadBacks() as reads:
        trainer._track_num_input_tokens(batch)
        trainer._track_num_input_tokens(batch)
    assert reads.n == 0  # transformers' own: one `.item()` per call
    assert trainer.state.num_input_tokens_seen == 10 and isinstance(trainer.state.num_input_tokens_seen, int)


def test_padded_training_counts_the_tokens_transformers_counts_with_no_read_back(tmp_path, monkeypatch):
    """A real padded training run (2 micro-batches a step, right-padded to a multiple of 8): trainer_state's
    num_input_tokens_seen is transformers' own number, the rows' real tokens, and counting them read nothing back."""
    from transformers import Trainer, TrainingArguments

    from tasks.engine.collate import PaddedCollator

    def train(trainer_class):
        torch.manual_seed(0)
        _, model = tiny_trainer(tmp_path)
        args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), use_cpu=True, report_to="none",
                                 include_num_input_tokens_seen="non_padding", per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, remove_unused_columns=False,
                                 save_strategy="no", dataloader_num_workers=0)
        trainer = trainer_class(model=model, args=args, train_dataset=padded_rows(), data_collator=PaddedCollator(pad_id=0))
        counted, reads = [], [0]
        track = trainer._track_num_input_tokens

        def tracked(inputs):
            with ReadBacks() as r:
                track(inputs)
            counted.append(1)
            reads[0] += r.n

        monkeypatch.setattr(trainer, "_track_num_input_tokens", tracked)
        trainer.train()
        return trainer.state.num_input_tokens_seen, len(counted), reads[0]

    theirs, calls, their_reads = train(Trainer)
    ours, our_calls, our_reads = train(bookkeeping_trainer())
    assert theirs == ours == sum((5, 9, 3, 12, 7, 4, 10, 6)) and calls == our_calls == 4
    assert their_reads >= calls and our_reads == 0
    assert isinstance(ours, int)


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
