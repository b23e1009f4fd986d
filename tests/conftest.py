"""Shared fixtures: the tiny profile, a private artifacts folder, and a Prefect test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def shared_artifacts(tmp_path_factory) -> str:
    """One artifacts dir per test session: the tiny model is built once and reused (it is content-keyed)."""
    return str(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def tiny_cfg(shared_artifacts):
    from tasks.config import load_config

    return load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}"])


@pytest.fixture(scope="session")
def tiny_tok(tiny_cfg, shared_artifacts):
    from tasks.models import load_tokenizer, resolve_model

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    return load_tokenizer(ref, tiny_cfg.model)


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` subprocess per test module (tests/prefect_local.py), for tests whose
    subprocesses (`serve`, workers, the CLI) must reach the API."""
    from prefect_local import LocalServer

    srv = LocalServer(tmp_path_factory.mktemp("prefect-home")).start()
    yield srv
    srv.stop()
