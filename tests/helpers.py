"""Helpers several test files share (plain functions; fixtures live in conftest.py). Import as `from helpers import ...`:
pytest puts tests/ on sys.path, as for prefect_local."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path


def randomize_lora_b(model, std: float = 0.05):
    """LoRA-B drawn at random, in place, seeded per parameter (its index in named_parameters): PEFT starts B at zero,
    which leaves LoRA-A without a gradient; with random B every LoRA weight gets one. Returns the model."""
    import torch

    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(i))
    return model


def run_probe_stage(monkeypatch, rec, cfg, data) -> tuple[list[str], list[dict]]:
    """Stage 3's Prefect wrapper (`probe_task.fn`) around a probe that returns `rec`, on a CUDA device: the wrapper's
    log lines and the keyword arguments of each markdown artifact it created."""
    from tasks import stages

    logs, artifacts = [], []
    monkeypatch.setattr(stages.probe_stage, "probe_throughput", lambda *a, **k: rec)
    monkeypatch.setattr(stages, "log", logs.append)
    monkeypatch.setattr(stages, "create_markdown_artifact", lambda **kw: artifacts.append(kw))
    stages.probe_task.fn(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cuda", "unused")
    return logs, artifacts


def liger_like_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                       labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                       cache_position=None, logits_to_keep=0, **kwargs):
    """A causal LM's forward that calls its backbone as Liger-Kernel 0.8.5's `lce_forward` does (prepare_fast_model
    patches it in on CUDA only, so the CPU never runs it): with `output_attentions`, `output_hidden_states`,
    `return_dict` and `cache_position`, of which transformers 5 passes the output flags and `cache_position` on to every
    decoder layer's kwargs. Logits and loss as transformers computes them (Liger fuses them; the layers do not see it)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    config = self.config
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=config.output_attentions if output_attentions is None else output_attentions,
                         output_hidden_states=config.output_hidden_states if output_hidden_states is None else output_hidden_states,
                         return_dict=True if return_dict is None else return_dict, cache_position=cache_position, **kwargs)
    logits = self.lm_head(outputs[0][:, slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep])
    shift_labels = kwargs.pop("shift_labels", None)  # after the backbone call, as Liger does: the layers see it
    loss = None if labels is None and shift_labels is None else self.loss_function(
        logits=logits, labels=labels, shift_labels=shift_labels, vocab_size=config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def _pause() -> bool:
    time.sleep(0.1)
    return True


def wait_for_training_step(art, step: int, *, running=lambda: True, between=_pause, timeout: float = 240.0) -> int:
    """Reads the training heartbeat under artifacts dir `art` (cache/train/*/work/heartbeat.json) until it reports
    `step` or later, `running()` turns false (the run ended) or `timeout` seconds pass; `between()` runs before each
    read (a 0.1 s sleep; one that returns False stops the wait). The last step read: 0 before the file appears."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline and running() and seen < step:
        if not between():
            break
        beat = sorted(Path(art).glob("cache/train/*/work/heartbeat.json"))
        seen = json.loads(beat[0].read_text())["step"] if beat else 0
    return seen


def task_run_states(flow_run_id) -> dict:
    """The flow run's task runs as the Prefect server holds them: task name (`4-train`) -> state."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state for r in runs}


def tqdm_clock(monkeypatch) -> list[float]:
    """tqdm's clock, replaced by one a test moves (`clock[0] += 5`): how often a bar redraws, without waiting."""
    import tqdm.std

    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])  # tqdm reads it through the module, bar by bar
    return clock


class TtyStream(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def assert_one_clear_line(output: str, prefix: str, *needles: str) -> str:
    """Exactly one `<prefix>` line, holding every needle (the problem and the fix); no traceback anywhere."""
    assert "Traceback" not in output, output[-4000:]
    lines = [l for l in output.splitlines() if l.startswith(prefix)]
    assert len(lines) == 1, f"expected one {prefix!r} line, got {lines}\n{output[-3000:]}"
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]
