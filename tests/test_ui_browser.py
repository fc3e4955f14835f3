"""The MLflow UI in a real browser: `mlipops ui` over a store with two real models (train -> evaluate -> promote,
different settings: one promoted, one rejected), driven by headless Chromium (Debian's chromium +
chromium-driver, installed by `make browser`) through Selenium.

What a user comes for (issue 25), each checked on the page and saved as a screenshot: the runs list in MLflow's
model-training view with the headline metrics as columns (runs.png), the compare view of the two runs with their
headline metrics side by side (compare.png), the registered model's version page with alias champion, the model
card as description and one tag per gate with its bound (model_version.png), the run's artifacts holding the
version folder with the melting and uncertainty reports (artifacts.png), and the rejected run's `promotion` tag
(rejected.png). Screenshots go to the test's temporary folder, or with MLIPOPS_SCREENSHOTS=1 to reports/ui/, the
ones the README shows (a plain `make test` leaves the working tree as it found it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import yaml

from httpwait import free_port, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "reports/ui"  # written only with MLIPOPS_SCREENSHOTS=1

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="Debian's chromium and chromium-driver are not installed (`make test` installs them as root: "
           "apt-get install chromium chromium-driver)")


def _frames(n: int = 16):
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
        split = {3: "val", 2: "test"}.get(k % 4, "train")
        a.info.update(config_type=f"crystal_{kind[0]}", split=split, frame_id=f"f{k:03d}")
        out.append(a)
    return out


def tiny_params(epochs: int, hidden: list[int], force_gate: float) -> dict:
    """params.yaml of a tiny project over _frames() (2-member ensembles, a few epochs): the σ ranking gate off
    (a few epochs' σ ranks nothing yet), ``promote.gates.val.force_mae`` = ``force_gate`` (1e-6: rejected)."""
    return {"ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]},
            "descriptors": {"cutoff": 4.0, "n_radial": 3, "n_angular": 2, "max_l": 1},
            "train": {"epochs": epochs, "hidden": hidden, "batch_size": 4, "learning_rate": 0.01, "device": "cpu",
                      "ensemble": {"members": 2}},
            "evaluate": {"uncertainty": {"min_spearman": -1.0}},
            "promote": {"gates": {"val.force_mae": force_gate}},
            "compute": {"n_workers": 2}}


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Two real models in one MLflow sqlite store, each `mlipops train`, `evaluate`, `promote` (2-member
    ensembles): 4 epochs, promoted as cu v1; 6 epochs and wider, rejected by a force gate it cannot pass."""
    from mlipops.frames import write_extxyz

    root = tmp_path_factory.mktemp("ui")
    write_extxyz(root / "data/curated/accepted.extxyz", _frames())
    for epochs, hidden, force_gate in ((4, [8], 10.0), (6, [12], 1e-6)):
        (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(epochs, hidden, force_gate)))
        for cmd in ("train", "evaluate", "promote"):
            r = subprocess.run([sys.executable, "-m", "mlipops.cli", cmd], cwd=root, env=_env(),
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, (cmd, r.stderr[-2000:])
    return root


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    """`mlipops ui` (mlflow ui on 127.0.0.1) on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui-server") / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlipops.cli", "ui", "--port", str(port)], cwd=project,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, log, "mlipops ui", timeout=120)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=2560,1100",
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


HEADLINE_SHOWN = ("gates_failed", "promoted", "test_energy_mae_meV_per_atom", "val_force_mae_meV_per_A")


@pytest.fixture(scope="module")
def store(project):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mlipops")
    parents = client.search_runs([exp.experiment_id], "tags.member = 'ensemble'", order_by=["attributes.start_time"])
    return client, exp, parents


def _shots(tmp_path) -> Path:
    shots = SCREENSHOTS if os.environ.get("MLIPOPS_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def test_runs_list_in_the_training_view_with_headline_columns(store, server, browser, tmp_path):
    client, exp, parents = store
    assert len(parents) == 2
    names = [r.info.run_name for r in parents]
    assert len(set(names)) == 2 and all(n.startswith("cu-ensemble-") for n in names)  # told apart by name
    members = client.search_runs([exp.experiment_id], "tags.member != 'ensemble'")
    assert len(members) == 4 and ({r.data.tags["mlflow.parentRunId"] for r in members}
                                  == {r.info.run_id for r in parents})
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for r in parents:  # the headline numbers, the dataset, the decision
        assert set(HEADLINE_SHOWN) <= set(r.data.metrics), sorted(r.data.metrics)[:20]
        assert r.data.metrics["val_force_mae_meV_per_A"] == pytest.approx(1000 * r.data.metrics["final_val_force_mae"],
                                                                          rel=1e-3)
        assert [d.dataset.name for d in r.inputs.dataset_inputs] == ["accepted.extxyz"]
    assert [r.data.tags["promotion"] for r in parents] == ["promoted", "rejected"]
    for r in parents:  # the detailed evaluation numbers in a nested run, grouped by prefix; a short parent
        (ev,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}' "
                                                        "and tags.`mlipops.nested` = 'evaluation'")
        assert ev.info.run_name == r.info.run_name + "-evaluation" and ev.info.status == "FINISHED"
        assert {"test/force_mae", "val/crystal_fcc/force_mae", "uncertainty/test/all/force_spearman"} <= set(
            ev.data.metrics)
        assert len(r.data.metrics) < 40 and not any(k.startswith("eval_") for k in r.data.metrics)
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")}
    assert {"plots/learning_curve.png", "plots/parity_forces.png"} <= arts

    browser.get(f"{server}/mlipops/runs/{exp.experiment_id}")  # the URL `mlipops ui` prints
    body = _wait_text(browser, ["Model training", *names, "8 matching runs", "Dataset", "accepted.extxyz",
                                *HEADLINE_SHOWN])
    assert "Traces" not in body.split("Runs")[-1][:200] and "/runs?workflowType=machine_learning" in browser.current_url
    browser.save_screenshot(str(_shots(tmp_path) / "runs.png"))
    # a user's own column choice is kept: the page only fills MLflow's default
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{exp.experiment_id}"]-ReactComponentState'
    state = json.loads(browser.execute_script("return window.localStorage.getItem(arguments[0])", key))
    browser.execute_script("window.localStorage.setItem(arguments[0], arguments[1])", key,
                           json.dumps(state | {"selectedColumns": ["metrics.`promoted`"]}))
    browser.get(f"{server}/mlipops/runs/{exp.experiment_id}")
    _wait_text(browser, [*names, "promoted"])
    assert json.loads(browser.execute_script("return window.localStorage.getItem(arguments[0])", key)
                      )["selectedColumns"] == ["metrics.`promoted`"]
    browser.execute_script("window.localStorage.setItem(arguments[0], arguments[1])", key, json.dumps(state))


def test_compare_view_shows_the_headline_metrics_side_by_side(store, server, browser, tmp_path):
    client, exp, parents = store
    names = [r.info.run_name for r in parents]
    ids = [r.info.run_id for r in parents]
    browser.get(f"{server}/#/compare-runs?runs={quote(json.dumps(ids))}"
                f"&experiments={quote(json.dumps([exp.experiment_id]))}&workflowType=machine_learning")
    body = _wait_text(browser, [*names, "train.epochs", "Metrics", "final_val_force_mae"])
    assert "Comparing 2 Runs" in body or "Comparing 2 runs" in body.replace("Runs", "runs")
    # the metrics table is a scroll box of seven rows: the training run's short list (final_*, then the headline
    # metrics, then wall_time_s) is all in it, each row with the two runs' values
    time.sleep(2)
    table = browser.execute_script("return document.body.textContent")
    table = table[table.rindex("Show diff only", 0, table.index("Artifacts")):table.index("Artifacts")]
    assert all(h in table for h in HEADLINE_SHOWN) and "eval_" not in table, table[:2000]
    for h in ("val_force_mae_meV_per_A", "promoted"):  # the two runs' numbers, as MLflow formats them
        for r in parents:
            v = r.data.metrics[h]
            assert f"{v:.4g}".rstrip("0").rstrip(".") in table or str(v) in table, (h, v)
    shot = _shots(tmp_path) / "compare.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_registered_version_explains_itself(store, server, browser, tmp_path):
    client, exp, parents = store
    mv = client.get_model_version_by_alias("cu", "champion")
    assert int(mv.version) == 1 and mv.run_id == parents[0].info.run_id
    assert mv.description.startswith("# Model card: cu v1")
    assert mv.tags["gate.val.force_mae"].startswith("pass: ") and "≤ 10" in mv.tags["gate.val.force_mae"]
    browser.get(f"{server}/#/models/cu/versions/1")
    _wait_text(browser, ["champion", "Model card: cu v1", "Headline metrics", "gate.val.force_mae", "≤ 10",
                         "Gates"])
    browser.save_screenshot(str(_shots(tmp_path) / "model_version.png"))


def test_run_artifacts_hold_the_version_and_its_reports(store, server, browser, tmp_path):
    client, exp, parents = store
    run_id = parents[0].info.run_id
    arts = {a.path for a in client.list_artifacts(run_id, "registry/v1")}
    assert {"registry/v1/model_card.md", "registry/v1/gates.json", "registry/v1/uncertainty"} <= arts
    browser.get(f"{server}/#/experiments/{exp.experiment_id}/runs/{run_id}/artifacts/registry/v1/model_card.md")
    _wait_text(browser, ["registry", "promotion", "model_card.md", "uncertainty", "Model card: cu v1"])
    browser.save_screenshot(str(_shots(tmp_path) / "artifacts.png"))


def test_the_rejected_run_says_so(store, server, browser, tmp_path):
    client, exp, parents = store
    rejected = parents[1]
    assert rejected.data.tags["promotion"] == "rejected"
    assert rejected.data.tags["mlipops.promotion.failed_gates"] == "val.force_mae"
    assert rejected.data.metrics["promoted"] == 0 and rejected.data.metrics["gates_failed"] == 1
    assert [int(v.version) for v in client.search_model_versions("name='cu'")] == [1]  # no version for it
    assert {a.path for a in client.list_artifacts(rejected.info.run_id, "promotion")} == {
        "promotion/decision.md", "promotion/gates.json"}
    browser.get(f"{server}/#/experiments/{exp.experiment_id}/runs/{rejected.info.run_id}")  # no workflowType
    body = _wait_text(browser, [rejected.info.run_name, "promotion", "rejected", "val.force_mae"])
    # the page `mlipops ui` prints made model training the browser's workflow: no GenAI sidebar on a run page
    assert browser.execute_script("return window.localStorage.getItem('mlflow.workflowType_v1')") == \
        '"machine_learning"'
    assert "Judges" not in body and "Prompts" not in body, body[:1500]
    browser.save_screenshot(str(_shots(tmp_path) / "rejected.png"))
