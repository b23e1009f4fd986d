"""Shared fixtures: the tiny profile, a private artifacts folder, and a Prefect test server."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The suite's own Prefect home (database, profiles, logs), set before anything imports Prefect: its runs (tiny-...,
# some FAILED or CRASHED by design) never land in the user's Prefect history, and a PREFECT_API_URL from the
# user's environment or profile cannot point the tests at their server. Removed when the session ends.
TEST_PREFECT_HOME = tempfile.mkdtemp(prefix="qlora-pipeline-tests-prefect-")
os.environ["PREFECT_HOME"] = TEST_PREFECT_HOME
os.environ["PREFECT_PROFILES_PATH"] = os.path.join(TEST_PREFECT_HOME, "profiles.toml")
for _var in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
    os.environ.pop(_var, None)
atexit.register(shutil.rmtree, TEST_PREFECT_HOME, True)

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


@pytest.fixture(scope="session")
def publish_smollm2(shared_artifacts):
    """Builds a published run of SmolLM2-135M (its HF weights stand in for a merged model, with `system` as the
    training system prompt) and exports it with the demo profile's export settings plus `overrides`:
    `publish(run, system, overrides, log_fn) -> (ExportRecord, published folder, held-out chats, data record)`.
    The run is `<artifacts>/runs/<run>/smollm2`; serve-model and chat find it by `run`."""

    def publish(run: str, system: str, overrides: tuple[str, ...] = (), log_fn=None):
        import json
        from types import SimpleNamespace

        from tasks.common import write_json
        from tasks.config import load_config
        from tasks.data import load_dataset_records
        from tasks.export import export_artifacts
        from tasks.models import resolve_model
        from tasks.publish import MANIFEST, install_system_prompt

        cfg = load_config(profile="demo", overrides=[f"artifacts_dir={shared_artifacts}", "data.embedded_train=64", "data.embedded_heldout=16",
                                                     "data.heldout_size=16", *overrides])
        data = load_dataset_records(cfg.data, cfg.model, shared_artifacts)
        ref = resolve_model(cfg.model, shared_artifacts)
        runs = Path(shared_artifacts) / "runs"
        pub = runs / run / "smollm2"
        if not pub.exists():
            shutil.copytree(ref.path, pub / "merged", ignore=shutil.ignore_patterns("COMPLETE"))
            install_system_prompt(pub / "merged", system)
            (pub / "README.md").write_text("# card\n")
            write_json(pub / "summary.json", {"data": {"stop_token_ids": data.stop_token_ids}})
            write_json(pub / MANIFEST, {"files": []})
            write_json(runs / run / "summary.json", {"published": str(pub)})
        rec = export_artifacts(SimpleNamespace(key=ref.fingerprint), SimpleNamespace(dir=str(pub), merged_dir=str(pub / "merged")),
                               data, cfg.export, system, shared_artifacts, log_fn)
        heldout = [json.loads(l)["messages"] for l in (Path(data.dir) / "heldout.jsonl").read_text().splitlines()]
        return rec, pub, heldout, data

    return publish
