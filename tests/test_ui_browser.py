"""The MLflow UI in a real browser: `mlipops ui` over a store with two real trainings, driven by headless
Chromium (Debian's chromium + chromium-driver, installed by `make test`) through Selenium.

The test opens the experiment page, checks that both parent runs are listed, opens the run-comparison
view of the two, checks that both runs and the same metrics appear there, and saves a screenshot of it
(compare.png) and of the run list (runs.png): to the test's temporary folder, or with MLIPOPS_SCREENSHOTS=1 to
reports/ui/, the ones the README shows (a plain `make test` leaves the working tree as it found it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "reports/ui"  # written only with MLIPOPS_SCREENSHOTS=1

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="Debian's chromium and chromium-driver are not installed (`make test` installs them as root: "
           "apt-get install chromium chromium-driver)")


def _frames(n: int = 12):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from mlipops.frames import set_labels

    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        kind = ("fcc", 3.61) if k % 3 else ("bcc", 2.87)
        a = bulk("Cu", kind[0], a=kind[1] * (1 + rng.uniform(-0.03, 0.03)), cubic=True).repeat(2)
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        a.calc = EMT()
        set_labels(a, a.get_potential_energy(), a.get_forces(), a.get_stress())
        a.info.update(config_type=f"crystal_{kind[0]}", split="val" if k % 4 == 3 else "train", frame_id=f"f{k:03d}")
        out.append(a)
    return out


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Two real `mlipops train` runs (2-member ensembles, different epochs) in one MLflow sqlite store."""
    from mlipops.frames import write_extxyz

    root = tmp_path_factory.mktemp("ui")
    write_extxyz(root / "data/curated/accepted.extxyz", _frames())
    params = {"ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]},
              "descriptors": {"cutoff": 4.0, "n_radial": 3, "n_angular": 2, "max_l": 1},
              "train": {"epochs": 4, "hidden": [8], "batch_size": 4, "learning_rate": 0.01, "device": "cpu",
                        "ensemble": {"members": 2}},
              "compute": {"n_workers": 2}}
    for epochs in (4, 6):
        params["train"]["epochs"] = epochs
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        r = subprocess.run([sys.executable, "-m", "mlipops.cli", "train"], cwd=root, env=_env(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def server(project):
    """`mlipops ui` (mlflow ui on 127.0.0.1) on a free port."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlipops.cli", "ui", "--port", str(port)], cwd=project,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlipops ui did not come up: {proc.stdout.read()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1600,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_text(driver, texts: list[str], timeout: float = 60) -> str:
    """Wait until the page's visible text contains every string; return the text."""
    deadline = time.time() + timeout
    body = ""
    while time.time() < deadline:
        try:
            body = driver.find_element("tag name", "body").text
        except Exception:  # noqa: BLE001 - the page is still being replaced
            body = ""
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"not on the page after {timeout} s: {missing}\n--- page text ---\n{body[:3000]}")


def test_experiment_page_and_compare_view_show_both_runs(project, server, browser, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mlipops")
    parents = client.search_runs([exp.experiment_id], "tags.member = 'ensemble'", order_by=["attributes.start_time"])
    assert len(parents) == 2
    names = [r.info.run_name for r in parents]
    assert len(set(names)) == 2 and all(n.startswith("cu-ensemble-") for n in names)  # told apart by name
    members = client.search_runs([exp.experiment_id], "tags.member != 'ensemble'")
    assert len(members) == 4 and ({r.data.tags["mlflow.parentRunId"] for r in members}
                                  == {r.info.run_id for r in parents})
    # the same metric names on both runs (the compare view lines them up)
    assert set(parents[0].data.metrics) == set(parents[1].data.metrics) >= {"final_val_force_mae",
                                                                            "final_train_energy_mae_per_atom"}
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")}
    assert {"plots/learning_curve.png", "plots/parity_forces.png"} <= arts

    browser.get(f"{server}/#/experiments/{exp.experiment_id}/runs")  # the experiment's training runs
    _wait_text(browser, ["mlipops", *names, "6 matching runs"])  # 2 parents, their 4 members nested
    shots = SCREENSHOTS if os.environ.get("MLIPOPS_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shots / "runs.png"))

    ids = [r.info.run_id for r in parents]
    browser.get(f"{server}/#/compare-runs?runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([exp.experiment_id]))}")
    body = _wait_text(browser, [*names, "final_val_force_mae", "train.epochs"])
    assert "Comparing 2 Runs" in body or "Comparing 2 runs" in body.replace("Runs", "runs")
    browser.save_screenshot(str(shots / "compare.png"))
    assert (shots / "compare.png").stat().st_size > 10_000
