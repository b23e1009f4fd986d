"""Helpers several test files share (plain functions; fixtures live in conftest.py). Import as `from helpers import ...`:
pytest puts tests/ on sys.path, as for prefect_local."""

from __future__ import annotations


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
