"""What an evaluation report was computed for: the model (sha256 of its weights) and the data version.

Every evaluation stage writes ``provenance.json`` next to its ``metrics.json``: ``stage``, ``model_name``,
``model_weights_sha256`` (sha256 of the model directory's ``weights.pt``, the model's identity: a retrained or
another model has other weights), ``data_md5`` (the md5 DVC records for the data, ``mlipops.frames.file_md5``)
and ``applies_to``: ``model`` (the report judges these weights) or ``architecture`` (the defects report: a
separately trained perfect-crystal model of the same architecture; no weights hash, only the data version).
The promote stage checks, for every report a gate reads, that its provenance is the promoted model's
(:func:`mismatch`); a report of another model or data version, or without provenance, fails its gates.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FILE = "provenance.json"
FORMAT = "mlipops.provenance/1"


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of ``<model_dir>/weights.pt`` (the same bytes in ``data/models/<name>`` and its registry copy)."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "weights.pt", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_data_md5(model_dir: str | Path) -> str | None:
    """The data version the model was trained on (``run.json``'s ``data_md5``); None without a run.json."""
    try:
        return json.loads((Path(model_dir) / "run.json").read_text()).get("data_md5")
    except (OSError, ValueError, AttributeError):
        return None


def model_identity(model_dir: str | Path, model_name: str | None = None) -> dict:
    """The ids a report of this model records (and that promote expects): name (default: config.json's
    ``model_name``, else the folder's name), weights sha256, training data md5."""
    if model_name is None:
        try:
            model_name = json.loads((Path(model_dir) / "config.json").read_text()).get("model_name")
        except (OSError, ValueError, AttributeError):
            pass
    return {"model_name": model_name or Path(model_dir).name, "model_weights_sha256": model_fingerprint(model_dir),
            "data_md5": model_data_md5(model_dir)}


def write_provenance(report_dir: str | Path, stage: str, *, model_name: str | None, model_weights_sha256: str | None,
                     data_md5: str | None, applies_to: str = "model", **extra) -> Path:
    """``<report_dir>/provenance.json`` (see the module doc); ``extra``: informative keys (not checked)."""
    if applies_to not in ("model", "architecture"):
        raise ValueError(f"applies_to must be 'model' or 'architecture' (got {applies_to!r})")
    path = Path(report_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "stage": stage, "applies_to": applies_to, "model_name": model_name,
           "model_weights_sha256": model_weights_sha256, "data_md5": data_md5, **extra}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def read_provenance(report_dir: str | Path) -> dict | None:
    """The report's provenance, or None when it has none (missing or unreadable file)."""
    try:
        doc = json.loads((Path(report_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _short(h: str | None) -> str:
    return "none" if not h else f"{h[:12]}…"


def mismatch(report_dir: str | Path, expected: dict) -> str | None:
    """None when the report in ``report_dir`` was computed for ``expected`` (:func:`model_identity`), else why not:
    no provenance, another model's weights, or another data version."""
    prov = read_provenance(report_dir)
    if prov is None:
        return (f"report {report_dir} has no {FILE}: it cannot be shown to be of the promoted model "
                "(rerun its stage)")
    if (prov.get("applies_to", "model") == "model"
            and prov.get("model_weights_sha256") != expected["model_weights_sha256"]):
        return (f"report {report_dir} was computed for model sha256 {_short(prov.get('model_weights_sha256'))} "
                f"({prov.get('model_name')}) but the promoted model is {_short(expected['model_weights_sha256'])} "
                f"({expected.get('model_name')})")
    if prov.get("data_md5") != expected["data_md5"]:
        return (f"report {report_dir} was computed for data md5 {_short(prov.get('data_md5'))} but the promoted "
                f"model was trained on data md5 {_short(expected['data_md5'])}")
    return None
