"""`mlipops report`: one self-contained HTML page per registered version (registry/<model>/v<N>/report.html).

Hermetic: each test builds a small version folder in tmp_path (index.json, gates, card, coverage.json, plots, a
report's summary.md) with hostile strings in every field that comes from data; the page is checked parsed (every
image a data: URI, no script, no external resource, one gates row per gate, escaped text), through the CLI (a
missing version is one line, exit 2), and in headless Chromium when Debian's chromium and chromium-driver are
installed (the skip condition and driver of tests/test_ui_browser.py). The promotion end to end (report.html in
every new version folder) is checked in tests/test_promote.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mlipops.errors import MlipopsError
from mlipops.promote.html_report import render, version_folder, write_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "reports/ui"  # written only with MLIPOPS_SCREENSHOTS=1
EVIL = "<script>alert('x')</script>"


def _png(rgb: tuple[int, int, int], w: int = 60, h: int = 40) -> bytes:
    """A real PNG of one colour (the browser test shows it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GATES = [{"gate": "val.force_mae", "value": 0.0345, "threshold": 0.1, "bound": "max", "passed": True, "note": ""},
         {"gate": f"val.{EVIL}.energy_mae_per_atom", "value": 0.5, "threshold": 0.02, "bound": "max",
          "passed": False, "note": f"exceeds the maximum by 0.48 {EVIL}"},
         {"gate": "uncertainty:test.all.force_spearman", "value": 0.83, "threshold": 0.3, "bound": "min",
          "passed": True, "note": ""},
         {"gate": "melting:bias_significance_excess_K", "value": None, "threshold": 0.0, "bound": "max",
          "passed": False, "not_applicable": "no reference oracle for Si"}]
CARD = f"""# Model card: cu v1

Registered from MLflow run `abc123`. A hostile line: {EVIL} <img src=x onerror=alert(1)>.

## Gates

| gate | result |
|---|---|
| {EVIL.replace('|', '')} | FAIL |

## Melting point (`melting/`)

Full report: [the melting summary](melting/summary.md); outside: [elsewhere](../../../secret.txt).

![Tm distribution](melting/distribution.png)

![remote](http://example.com/track.png)
"""


def _registry(tmp_path: Path, aliases: dict | None = None) -> Path:
    """registry/ with cu v1 (and an index entry as promotion writes it)."""
    reg = tmp_path / "registry"
    v1 = reg / "cu/v1"
    (v1 / "melting").mkdir(parents=True)
    (v1 / "weights.pt").write_bytes(b"not really torch, hashed only")
    (v1 / "config.json").write_text("{}")
    (v1 / "run.json").write_text(json.dumps({"run_id": "0123abcd", "experiment_id": "1", "tracking_uri": "sqlite:///m.db",
                                             "data_md5": "d" * 32, "member_run_ids": ["a", "b"]}))
    (v1 / "gates.json").write_text(json.dumps(GATES))
    (v1 / "model_card.md").write_text(CARD)
    (v1 / "coverage.json").write_text(json.dumps({"available": True, "dataset_id": "d" * 32, "tables": {
        "By split and config_type": {"columns": ["split", "config_type", "n_frames", "fraction_outside_hull"],
                                     "rows": [["train", "crystal_fcc", 12, 0.0], ["test", EVIL, 3, 0.75],
                                              ["test", "liquid", 1, None]]}}}))
    (v1 / "parity_val_energy.png").write_bytes(_png((200, 30, 30)))
    (v1 / "parity_val_forces.png").write_bytes(_png((30, 200, 30)))
    (v1 / "melting/distribution.png").write_bytes(_png((30, 30, 200)))
    (v1 / "melting/traces.png").write_bytes(_png((120, 120, 0)))
    (v1 / "melting/summary.md").write_text("# Melting point of `cu`\n\nTm = 1350 K. [metrics](metrics.json)\n\n"
                                           "![Tm of each member](distribution.png)\n")
    (v1 / "melting/metrics.json").write_text("{}")
    (tmp_path / "secret.png").write_bytes(_png((0, 0, 0)))
    (v1 / "leak.png").symlink_to(tmp_path / "secret.png")  # never followed: not embedded, not listed
    entry = {"version": 1, "path": "cu/v1", "run_id": "0123abcd", "created": "2026-01-02T03:04:05Z",
             "data_md5": "d" * 32, "git_commit": "c0ffee" * 6, "n_gates": 3, "n_gates_passed": 2}
    (reg / "index.json").write_text(json.dumps({"models": {"cu": {
        "versions": [entry], "aliases": {"champion": 1} if aliases is None else aliases}}}))
    return reg


class _Page(HTMLParser):
    """Tags of interest: images, links, scripts, the gates table's rows and their class, the visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.hrefs, self.tags, self.gate_rows, self.text = [], [], [], [], []
        self._in_gates = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("a", "link"):
            self.hrefs.append(a.get("href", ""))
        if tag == "table" and a.get("id") == "gates-table":
            self._in_gates = True
        if tag == "tr" and self._in_gates and a.get("class"):
            self.gate_rows.append(a["class"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_gates = False

    def handle_data(self, data):
        self.text.append(data)


def test_the_page_is_self_contained_and_embeds_every_plot(tmp_path):
    v1 = _registry(tmp_path) / "cu/v1"
    html = render(v1)
    page = _Page(html)
    assert 'src="http' not in html and '<link href="http' not in html and "<link" not in html
    assert "script" not in page.tags and "iframe" not in page.tags
    assert "default-src 'none'" in html  # the CSP: nothing external would load even if a URL slipped in
    assert all(src.startswith("data:image/") for src in page.imgs), page.imgs
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in page.imgs}
    pngs = [p for p in v1.rglob("*.png") if not p.is_symlink()]
    assert len(pngs) == 4 and {p.read_bytes() for p in pngs} == embedded  # every plot, and only the folder's own
    assert _png((0, 0, 0)) not in embedded and "leak.png" not in html  # the symlink out of the folder
    # each figure once, with its caption (the alt text its report gives it, else its name)
    assert sum(s == "data:image/png;base64," + base64.b64encode(_png((120, 120, 0))).decode() for s in page.imgs) == 1
    assert "Tm of each member" in html and "parity val forces" in html
    # the card's own image inlined in the card; the remote one never loaded
    card = html.split('<article class="card">')[1].split("</article>")[0]
    assert base64.b64encode((v1 / "melting/distribution.png").read_bytes()).decode() in card
    assert "[image not embedded: remote (http://example.com/track.png)]" in card
    assert render(v1) == html  # deterministic: rewriting it changes nothing


def test_gates_table_one_row_per_gate_and_highlighted(tmp_path):
    page = _Page(render(_registry(tmp_path) / "cu/v1"))
    assert page.gate_rows == ["pass", "fail", "pass", "na"]
    text = "".join(page.text)
    assert "Gates: 2/3 passed, 1 FAILED, 1 not applicable" in text
    assert "≤ 0.1" in text and "≥ 0.3" in text and "no reference oracle for Si" in text


def test_data_is_escaped_never_markup(tmp_path):
    html = render(_registry(tmp_path) / "cu/v1")
    page = _Page(html)
    assert "<script" not in html and "<img src=x" not in html and "script" not in page.tags
    text = "".join(page.text)
    # the hostile strings are on the page as text: in a gate name, its note, the card and a coverage config_type
    assert text.count(EVIL) >= 4, text.count(EVIL)
    assert "<img src=x onerror=alert(1)>" in text


def test_links_to_the_folders_files_work_from_the_page(tmp_path):
    v1 = _registry(tmp_path) / "cu/v1"
    page = _Page(render(v1))
    local = [h for h in page.hrefs if h and not h.startswith(("#", "http"))]
    assert {"weights.pt", "model_card.md", "melting/summary.md", "melting/metrics.json"} <= set(local)
    # the summary's own link (metrics.json, relative to melting/) rewritten relative to the page
    for h in local:
        assert (v1 / h.split("#")[0]).is_file() or h == "../../../secret.txt", h
    assert any(h.startswith("#fig-") for h in page.hrefs)  # the summary's image: a link to its figure


def test_write_report_and_the_default_version(tmp_path):
    reg = _registry(tmp_path)
    path = write_report(version_folder(reg, "cu"))
    assert path == reg / "cu/v1/report.html" and path.read_text().startswith("<!DOCTYPE html>")
    assert "report.html" not in render(reg / "cu/v1")  # the page does not list itself
    reg2 = _registry(tmp_path / "b", aliases={})  # no champion: the latest version
    assert version_folder(reg2, "cu") == reg2 / "cu/v1"
    for args, msg in (((reg, "cu", 7), "cu has no version 7"), ((reg, "mo"), "model 'mo' is not in the registry"),
                      ((tmp_path / "none", "cu"), "registry index missing")):
        with pytest.raises(MlipopsError, match=msg):
            version_folder(*args)


def test_a_version_folder_without_coverage_json_says_where_its_coverage_is(tmp_path):
    v1 = _registry(tmp_path) / "cu/v1"
    (v1 / "coverage.json").unlink()
    assert "No coverage.json in this folder" in render(v1)
    (v1 / "coverage.json").write_text(json.dumps({"available": False, "reason": "index missing at promotion"}))
    assert "index missing at promotion" in render(v1)


def test_promotion_keeps_the_coverage_tables_of_its_index(tmp_path):
    """coverage.json from a real (tiny) index of the index's schema: every table of COVERAGE_TABLES, NULL as
    null, and on the page, escaped."""
    import duckdb

    from mlipops.index.build import SCHEMA
    from mlipops.promote.registry import COVERAGE_TABLES, _coverage_tables

    db = tmp_path / "index.duckdb"
    con = duckdb.connect(str(db))
    con.execute(SCHEMA.read_text())
    con.execute(f"INSERT INTO datasets VALUES ('{'d' * 32}', 'accepted.extxyz', 3, 0, now(), '0.1.0')")
    con.executemany("INSERT INTO frames (frame_id, dataset_id, status, split, config_type, n_atoms, energy_per_atom, "
                    "temperature_K) VALUES (?, ?, 'accepted', ?, ?, 2, -3.5, ?)",
                    [["f1", "d" * 32, "train", "crystal_fcc", None], ["f2", "d" * 32, "test", EVIL, 1500.0],
                     ["f3", "d" * 32, "test", "liquid", None]])
    con.executemany("INSERT INTO atoms (frame_id, atom_index, split, config_type, species, coordination, inside_hull, "
                    "extrapolation_grade) VALUES (?, ?, ?, ?, 'Cu', 12, ?, ?)",
                    [["f1", 0, "train", "crystal_fcc", True, 1.0], ["f1", 1, "train", "crystal_fcc", True, 0.9],
                     ["f2", 0, "test", EVIL, False, 2.5], ["f2", 1, "test", EVIL, True, 0.8],
                     ["f3", 0, "test", "liquid", True, 0.5], ["f3", 1, "test", "liquid", True, 0.7]])
    con.execute("INSERT INTO hull VALUES ('Cu', 'pca+lp', 2, 2, 2, 2, 0.95, [0.6, 0.35], 'train', ['Cu'], '{}', "
                "[0.0], [1.0], [[1.0], [0.0]], [0.0, 0.0])")
    con.close()
    cov = _coverage_tables(db)
    assert cov["available"] and cov["dataset_id"] == "d" * 32 and list(cov["tables"]) == list(COVERAGE_TABLES)
    by_config = cov["tables"]["By split and config_type"]
    rows = {(r[0], r[1]): dict(zip(by_config["columns"], r)) for r in by_config["rows"]}
    assert rows[("test", EVIL)]["fraction_outside_hull"] == 0.5 and rows[("test", EVIL)]["n_atoms_outside_hull"] == 1
    assert rows[("train", "crystal_fcc")]["min_temperature_K"] is None  # NULL as null: valid JSON
    assert cov["tables"]["Training hull per species"]["rows"] == [["Cu", "pca+lp", 2, 2, 2, 2, 0.95, "train"]]
    json.dumps(cov, allow_nan=False)
    v1 = _registry(tmp_path / "p") / "cu/v1"
    (v1 / "coverage.json").write_text(json.dumps(cov))
    coverage = render(v1).split('<section id="coverage">')[1].split("</section>")[0]
    assert coverage.count("<table>") == len(COVERAGE_TABLES) and "&lt;script&gt;" in coverage
    assert "<script" not in coverage and "The index was built for data" not in coverage
    assert _coverage_tables(tmp_path / "none.duckdb") == {
        "available": False, "reason": f"the coverage index {tmp_path / 'none.duckdb'} was missing at promotion"}


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def test_cli_writes_the_page_and_a_missing_version_is_one_line(tmp_path, monkeypatch, capsys):
    from mlipops.cli import main

    reg = _registry(tmp_path)
    monkeypatch.chdir(tmp_path)

    def mlipops(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["mlipops", "report", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = mlipops("--model", "cu", "--registry-dir", str(reg))
    assert code == 0 and out.strip() == str(reg / "cu/v1/report.html"), err
    assert (reg / "cu/v1/report.html").is_file()
    (tmp_path / "params.yaml").write_text("ingest: {sources: [{path: x.extxyz}]}\nvalidate: {allowed_species: [Cu]}\n"
                                          "train: {model_name: cu}\npromote: {registry_dir: registry}\n")
    code, out, err = mlipops("--version", "1")  # model and registry from params.yaml
    assert code == 0 and out.strip() == str(Path("registry/cu/v1/report.html")), err
    for args, msg in ((["--model", "mo"], "model 'mo' is not in the registry"),
                      (["--registry-dir", "nowhere"], "registry index missing"),
                      (["--version", "0"], "greater than or equal to 1"), (["--bogus"], "No such option")):
        code, out, err = mlipops(*args)
        assert code == 2 and msg in err and "Traceback" not in err and "internal error" not in err, err
    # the real entry point in its own process: one line, exit 2, no traceback
    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "report", "--version", "7"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"mlipops: error: {Path('registry/index.json')}: cu has no version 7\n", \
        r.stderr


@pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
                    reason="Debian's chromium and chromium-driver are not installed (`make test` installs them as "
                           "root: apt-get install chromium chromium-driver)")
def test_the_page_in_a_browser(tmp_path):
    """The page opened from disk in headless Chromium: title, heading, gates table and plots visible, and no
    resource it asked for was refused (nothing external, no script)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    path = write_report(_registry(tmp_path) / "cu/v1")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1400", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(path.resolve().as_uri())
        assert driver.title == "cu v1: model report"
        h1 = driver.find_element("id", "title")
        assert h1.is_displayed() and h1.text == "cu v1: model report"
        assert driver.find_element("css selector", "article.card h1").text == "Model card: cu v1"
        table = driver.find_element("id", "gates-table")
        assert table.is_displayed()
        rows = table.find_elements("css selector", "tbody tr")
        assert [r.get_attribute("class") for r in rows] == ["pass", "fail", "pass", "na"]
        assert EVIL in rows[1].text and "FAIL" in rows[1].text
        imgs = driver.find_elements("css selector", "figure img")
        assert len(imgs) == 4 and all(driver.execute_script("return arguments[0].naturalWidth", i) == 60 for i in imgs)
        shots = SCREENSHOTS if os.environ.get("MLIPOPS_SCREENSHOTS") == "1" else tmp_path
        shots.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shots / "report.png"))
    finally:
        driver.quit()


def test_a_coverage_table_the_index_cannot_give_is_noted_not_fatal(tmp_path):
    """An index whose temperature view cannot convert a value (a NaN temperature, written by an older version)
    costs that table only: promotion goes on, the page says which table and why. The index stores a NaN or
    non-numeric temperature as NULL now."""
    import duckdb
    from ase import Atoms

    from mlipops.index.build import SCHEMA, _frame_row
    from mlipops.promote.registry import _coverage_tables

    db = tmp_path / "index.duckdb"
    con = duckdb.connect(str(db))
    con.execute(SCHEMA.read_text())
    con.execute(f"INSERT INTO datasets VALUES ('{'d' * 32}', 'accepted.extxyz', 1, 0, now(), '0.1.0')")
    con.execute("INSERT INTO frames (frame_id, dataset_id, status, split, config_type, n_atoms, temperature_K) "
                "VALUES ('f1', ?, 'accepted', 'train', 'liquid', 2, 'NaN'::DOUBLE)", ["d" * 32])
    con.close()
    cov = _coverage_tables(db)
    assert "error" in cov["tables"]["By temperature (MD snapshots)"]
    assert "rows" in cov["tables"]["By split and config_type"]
    v1 = _registry(tmp_path / "p") / "cu/v1"
    (v1 / "coverage.json").write_text(json.dumps(cov))
    assert "not read from the index at promotion" in render(v1)
    for t in (float("nan"), "hot", None):
        a = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]], info={"frame_id": "x", "temperature_K": t})
        assert _frame_row(a, "d", "accepted")["temperature_K"] is None
