"""The run history as a user reads it, following the README: a real Prefect server on a free loopback port,
`qlora-pipeline serve`, `prefect deployment run finetune/nightly -p ...` on the tiny profile, and the UI opened
in headless Debian Chromium (selenium + chromedriver, no downloads). Asserts the scheduled deployment, the flow
run (named <profile>-<budget>-<date>), the seven stage task runs and the eval table are on screen; screenshots
go to the test's tmp dir. CI installs Chromium in .ci/run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from prefect_local import LocalServer, Serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
STAGE_TASKS = ["1-data", "2-profile", "3-probe", "4-train", "5-evaluate", "6-merge", "7-publish", "8-export"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
                       reason="needs Debian chromium + chromedriver: apt-get install -y chromium chromium-driver (.ci/run does)"),
]


def _chromium(profile_dir: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1200", f"--user-data-dir={profile_dir}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def _wait_for_text(driver, *patterns: str, timeout: float = 90) -> str:
    """Wait until the page's visible text matches every regex; returns that text (or fails listing what's missing)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    seen = {"text": ""}

    def all_there(d) -> bool:
        seen["text"] = d.find_element(By.TAG_NAME, "body").text
        return all(re.search(p, seen["text"]) for p in patterns)

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(all_there)
    except TimeoutException:
        missing = [p for p in patterns if not re.search(p, seen["text"])]
        raise AssertionError(f"not on screen at {driver.current_url} after {timeout}s: {missing}\n{seen['text'][:2000]}") from None
    return seen["text"]


@pytest.fixture()
def server(tmp_path):
    srv = LocalServer(tmp_path / "prefect-home").start()
    yield srv
    srv.stop()


def test_deployment_run_its_seven_stages_and_the_eval_artifact_are_visible_in_the_ui(server, tmp_path):
    served = Serve(server, log=tmp_path / "serve.log").start()
    try:
        run_id = server.run_deployment("finetune/nightly", profile="tiny", hours=None, minutes=1,
                                       overrides=[f"artifacts_dir={tmp_path / 'artifacts'}"])
        run = server.wait(run_id)
    finally:
        served.stop()
    assert run["state_type"] == "COMPLETED", (run["state"], served.log.read_text()[-3000:])
    assert re.match(r"tiny-1m-\d{8}-\d{6}", run["name"]), run["name"]  # <profile>-<budget>-<date>
    [artifact] = server.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["eval-base-vs-tuned"]}}})

    driver = _chromium(tmp_path / "chromium-profile")
    try:
        driver.get(f"{server.url}/deployments/deployment/{run['deployment_id']}")
        _wait_for_text(driver, r"\bnightly\b", r"At 02:00|0 2 \* \* \*")  # the deployment and its cron schedule
        driver.save_screenshot(str(tmp_path / "deployment.png"))

        driver.get(f"{server.url}/runs/flow-run/{run['id']}")
        _wait_for_text(driver, re.escape(run["name"]), "Completed", "8 Task runs")
        driver.save_screenshot(str(tmp_path / "flow-run.png"))

        driver.find_element("id", "task-runs").click()
        _wait_for_text(driver, r"\(8 Completed\)", *(rf"\b{name}-[0-9a-f]{{3}}\b" for name in STAGE_TASKS))
        driver.save_screenshot(str(tmp_path / "task-runs.png"))

        driver.find_element("id", "artifacts").click()
        _wait_for_text(driver, r"\beval-base-vs-tuned\b", r"\beval-report\b", r"\bloss-curve\b", r"\bpublished-model\b")
        driver.save_screenshot(str(tmp_path / "artifacts.png"))

        driver.get(f"{server.url}/artifacts/artifact/{artifact['id']}")  # the base-vs-tuned table itself
        _wait_for_text(driver, r"base_accuracy", r"tuned_accuracy", r"\bOVERALL\b", re.escape(run["name"]), r"5-evaluate-")
        driver.save_screenshot(str(tmp_path / "eval-table.png"))
    finally:
        driver.quit()
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("deployment.png", "flow-run.png", "task-runs.png", "artifacts.png", "eval-table.png"))
