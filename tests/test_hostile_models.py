"""A model folder is data (issue 30, items 1 and 7): hostile config.json and weights.pt files.

Loading a model runs no code named by its files: a config.json baseline may name only the built-in
calculators (emt, lj, morse) or the one params.yaml's ``train.baseline.calculator`` names, passed as
trusted; every field is type- and range-checked and the model's size bounded before a tensor is
allocated; weights.pt is a bounded ``torch.load(weights_only=True)`` whose tensors must fit the config.
Every failure is one line naming the file and the key. Each hostile model is a real tiny potential
saved by ``Potential.save`` / ``Ensemble.save`` with one thing changed; the CLI cases run
``python -m mlipops.cli registry load`` in a temporary project with a real registry folder.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.io import write

from mlipops.errors import MlipopsError
from mlipops.models import Ensemble, MlipopsCalculator, Potential, load_model
from mlipops.params import DescriptorParams
from test_bad_input import error_line, mlipops

D = DescriptorParams(cutoff=4.0, n_radial=4, angular_cutoff=3.5, n_angular=2, max_l=1).model_dump()
IDEAL_GAS = "ase.calculators.idealgas.IdealGas"  # an ASE calculator that is not a built-in baseline (E = 0)


class _System:
    """Pickles as ``os.system(command)``: a weights.pt that runs a shell command when unpickled unsafely."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _model(directory: Path, arch=(4,), members: int = 0, **config) -> Path:
    """A real tiny Cu potential (or ensemble) saved to ``directory``; ``config`` overrides config.json keys."""
    torch.manual_seed(0)
    pots = [Potential(["Cu"], D, list(arch)) for _ in range(max(members, 1))]
    (Ensemble(pots) if members else pots[0]).save(directory, extra={"model_name": "cu"})
    if config:
        _edit(directory, **config)
    return directory


def _edit(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _registry(root: Path, **config) -> Path:
    """A project ``root`` whose registry holds ``cu@v1`` (config.json keys overridden by ``config``)."""
    d = _model(root / "registry/cu/v1", **config)
    (d / "gates.json").write_text(json.dumps({"passed": True, "gates": []}))  # a promoted version's other files
    (d / "model_card.md").write_text("# cu v1\n")
    (root / "registry/index.json").write_text(json.dumps({"models": {"cu": {
        "aliases": {"champion": 1}, "versions": [{"version": 1, "path": "cu/v1"}]}}}))
    write(root / "s.extxyz", bulk("Cu", "fcc", a=3.6, cubic=True))
    return root / "registry/cu/v1"


def _one_line(exc: pytest.ExceptionInfo, file: Path, key: str | None = None) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 600, msg
    assert msg.startswith(f"{file}: " + (f"field '{key}': " if key else "")), msg
    return msg


def _popen(marker: Path) -> dict:
    return {"calculator": "subprocess.Popen", "kwargs": {"args": ["touch", str(marker)]}}


def _energy(calc) -> float:
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.calc = calc
    return a.get_potential_energy()


# ----------------------------------------------------------------------------- 1: no code from config.json
def test_popen_baseline_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "PWNED"
    d = _model(tmp_path / "m", baseline=_popen(marker))
    with pytest.raises(MlipopsError) as exc:
        _energy(MlipopsCalculator(d))
    time.sleep(0.3)  # a spawned `touch` would have run by now
    assert not marker.exists()
    msg = _one_line(exc, d / "config.json", "baseline.calculator")
    assert "'subprocess.Popen' is not an allowed baseline (built-ins: emt, lj, morse;" in msg
    with pytest.raises(MlipopsError, match="not an allowed baseline"):  # not even when another one is trusted
        load_model(d, trusted_calculators=[IDEAL_GAS])
    assert not marker.exists()


def test_registry_load_refuses_a_device_as_structure_file(tmp_path):
    """`-s /dev/zero` is refused before reading (it would never end) with one line, like every source."""
    _registry(tmp_path)
    line = error_line(mlipops(tmp_path, "registry", "load", "cu@v1", "-s", "/dev/zero"))
    assert line.startswith("mlipops: error: /dev/zero: not a regular file"), line


def test_popen_baseline_through_registry_load(tmp_path):
    marker = tmp_path / "PWNED"
    d = _registry(tmp_path, baseline=_popen(marker))
    line = error_line(mlipops(tmp_path, "registry", "load", "cu@v1", "-s", "s.extxyz"))
    time.sleep(0.3)
    assert not marker.exists()
    assert line.startswith(f"mlipops: error: {Path('registry/cu/v1/config.json')}: field 'baseline.calculator': "
                           "'subprocess.Popen' is not an allowed baseline"), line
    assert d.is_dir()


def test_builtin_baseline_by_short_name_or_import_path(tmp_path):
    short = _model(tmp_path / "short", baseline={"calculator": "morse", "kwargs": {"epsilon": 0.34, "r0": 2.87}})
    full = _model(tmp_path / "full", baseline={"calculator": "ase.calculators.morse.MorsePotential",
                                               "kwargs": {"epsilon": 0.34, "r0": 2.87}})
    plain = _model(tmp_path / "plain")
    e_short, e_full, e_plain = (_energy(MlipopsCalculator(d)) for d in (short, full, plain))
    assert e_short == e_full and e_short != e_plain
    assert load_model(short).baseline.spec["calculator"] == "ase.calculators.morse.MorsePotential"


def test_other_calculator_only_when_trusted(tmp_path):
    d = _model(tmp_path / "m", baseline={"calculator": IDEAL_GAS, "kwargs": {}})
    with pytest.raises(MlipopsError) as exc:
        MlipopsCalculator(d)
    assert "is not an allowed baseline" in _one_line(exc, d / "config.json", "baseline.calculator")
    # trusted by path, or by params.yaml's calculator with its keywords: the ideal gas adds nothing
    e_plain = _energy(MlipopsCalculator(_model(tmp_path / "plain")))
    assert _energy(MlipopsCalculator(d, trusted_calculators=[IDEAL_GAS])) == e_plain
    assert _energy(MlipopsCalculator(d, trusted_calculators={IDEAL_GAS: {}})) == e_plain
    # the keywords params.yaml trusts the calculator with are the only ones the model may give it
    _edit(d, baseline={"calculator": IDEAL_GAS, "kwargs": {"command": "touch x"}})
    with pytest.raises(MlipopsError) as exc:
        load_model(d, trusted_calculators={IDEAL_GAS: {}})
    assert "differ from the keywords params.yaml's train.baseline.kwargs trusts" in _one_line(
        exc, d / "config.json", "baseline.kwargs")


def test_registry_load_trusts_the_calculator_params_yaml_names(tmp_path):
    _registry(tmp_path, baseline={"calculator": IDEAL_GAS, "kwargs": {}})
    args = ("registry", "load", "cu@v1", "-s", "s.extxyz", "--json")
    assert "is not an allowed baseline" in error_line(mlipops(tmp_path, *args))  # no params.yaml: built-ins only
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]},
        "train": {"model_name": "cu", "baseline": {"calculator": IDEAL_GAS, "kwargs": {}}}}))
    r = mlipops(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert [row["n_atoms"] for row in json.loads(r.stdout)] == [4]


# ------------------------------------------------------------------------ 7: types and sizes of config.json
BAD_FIELDS = [
    ("hidden", "32", "hidden", "expected a list of at most 16 layer widths, got '32'"),
    ("hidden", [8, "8"], "hidden[1]", "expected a positive integer, got '8'"),
    ("hidden", [8, -1], "hidden[1]", "expected a positive integer, got -1"),
    ("descriptor", D | {"cutoff": "5"}, "descriptor.cutoff", "expected a number in (0, 50], got '5'"),
    ("descriptor", D | {"n_radial": 2.5}, "descriptor.n_radial", "expected an integer in [1, 256], got 2.5"),
    ("descriptor", D | {"n_radial": 10**9}, "descriptor.n_radial", "expected an integer in [1, 256]"),
    ("descriptor", D | {"evil": 1}, "descriptor", "unknown key(s) ['evil']"),
    ("species", "Cu", "species", "expected a list of chemical symbols, got 'Cu'"),
    ("dispersion", {"kind": "d2"}, "dispersion", "dispersion term lacks"),
    ("baseline", "emt", "baseline", "expected a JSON object, got 'emt'"),
    ("baseline", {"calculator": "morse", "kwargs": {"epsilon": "0.3"}}, "baseline.kwargs.epsilon",
     "expected a number, true/false or null, got '0.3'"),
    ("baseline", {"calculator": "morse", "kwargs": {"epsilon": {"calculator": "os.system"}}},
     "baseline.kwargs.epsilon", "expected a number, true/false or null"),
    ("baseline", {"calculator": "lj", "kwargs": {"sigmaa": 1.0}}, "baseline.kwargs", "unknown parameter(s) ['sigmaa']"),
]


@pytest.mark.parametrize("key,value,field,message", BAD_FIELDS, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_FIELDS)])
def test_wrong_config_types_are_named(tmp_path, key, value, field, message):
    d = _model(tmp_path / "m", **{key: value})
    with pytest.raises(MlipopsError) as exc:
        _energy(MlipopsCalculator(d))
    assert message in _one_line(exc, d / "config.json", field)


def test_huge_model_is_refused_before_allocation(tmp_path):
    d = _model(tmp_path / "m", hidden=[200000, 200000])
    t0 = time.perf_counter()
    with pytest.raises(MlipopsError) as exc:
        load_model(d)
    assert time.perf_counter() - t0 < 2.0
    msg = _one_line(exc, d / "config.json", "hidden")
    assert "make 40,002,200,020 parameters, more than the cap of 50,000,000" in msg, msg
    e = _model(tmp_path / "e", members=2, n_members=1000)
    with pytest.raises(MlipopsError) as exc:
        load_model(e)
    assert "expected an integer in [1, 64], got 1000" in _one_line(exc, e / "config.json", "n_members")


def test_oversized_config_is_not_parsed(tmp_path):
    d = _model(tmp_path / "m")
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg[:-2] + " " * (5 << 20) + cfg[-2:])  # valid JSON, 5 MiB
    with pytest.raises(MlipopsError) as exc:
        load_model(d)
    assert "more than a model config can be" in _one_line(exc, d / "config.json")


# ------------------------------------------------------------------------------- 7: weights.pt
def _zip_pickle(path: Path, obj) -> None:
    torch.save(obj, path)  # a real PyTorch zip archive whose data.pkl holds ``obj``


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_booby_trapped_weights_run_nothing(tmp_path, kind):
    marker = tmp_path / "PWNED"
    d = _model(tmp_path / "m")
    trap = {"e0": _System(f"touch {marker}")}
    if kind == "zip":
        _zip_pickle(d / "weights.pt", trap)
    else:
        (d / "weights.pt").write_bytes(pickle.dumps(trap))
    with pytest.raises(MlipopsError) as exc:
        _energy(MlipopsCalculator(d))
    assert not marker.exists()
    msg = _one_line(exc, d / "weights.pt")
    expected = ("unsupported GLOBAL posix.system" if os.name == "posix" else "GLOBAL") if kind == "zip" \
        else "not a PyTorch zip archive"
    assert msg.startswith(f"{d / 'weights.pt'}: not a valid weights file: ") and expected in msg, msg
    assert "weights_only" not in msg and "trusted source" not in msg  # no advice to load it unsafely


def _deflated(good: bytes) -> bytes:
    """The same archive with its entries deflated (a zip bomb would be one)."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for e in src.infolist():
            dst.writestr(e.filename, src.read(e))
    return out.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "padded", "deflated"])
def test_damaged_weights_are_one_line(tmp_path, damage):
    d = _model(tmp_path / "m")
    w = d / "weights.pt"
    good = w.read_bytes()
    w.write_bytes({"truncated": lambda: good[: len(good) // 2], "text": lambda: b"hello, I am not a model\n",
                   "empty": lambda: b"", "padded": lambda: good + b"\0" * (3 << 20),
                   "deflated": lambda: _deflated(good)}[damage]())
    with pytest.raises(MlipopsError) as exc:
        load_model(d)
    msg = _one_line(exc, w)
    reason = msg.removeprefix(f"{w}: not a valid weights file: ")
    assert reason != msg and 0 < len(reason) <= 200, msg
    assert {"truncated": "not a PyTorch zip archive", "text": "not a PyTorch zip archive", "empty": "empty file",
            "padded": "more than the", "deflated": "compressed"}[damage] in reason, msg


def test_weights_of_another_shape_name_the_tensor(tmp_path):
    d = _model(tmp_path / "m", arch=(4,))
    _edit(d, hidden=[5])
    with pytest.raises(MlipopsError) as exc:
        load_model(d)
    msg = _one_line(exc, d / "weights.pt", "mlps.0.net.0.weight")
    assert "shape [4, 8] in the file, [5, 8] from config.json" in msg, msg
    # a state dict that is not one: a tensor, or a dict with a non-tensor value
    _edit(d, hidden=[4])
    _zip_pickle(d / "weights.pt", torch.zeros(3))
    with pytest.raises(MlipopsError, match="expected a state dict of named tensors, got Tensor"):
        load_model(d)


def test_hostile_weights_through_registry_load(tmp_path):
    marker = tmp_path / "PWNED"
    d = _registry(tmp_path)
    _zip_pickle(d / "weights.pt", {"e0": _System(f"touch {marker}")})
    line = error_line(mlipops(tmp_path, "registry", "load", "cu@v1", "-s", "s.extxyz"))
    assert not marker.exists()
    assert line.startswith(f"mlipops: error: {Path('registry/cu/v1/weights.pt')}: not a valid weights file: "), line


@pytest.mark.parametrize("scale,message", [({"energy": "2"}, "expected a non-negative number, got '2'"),
                                           ({"forces": -1.0}, "expected a non-negative number, got '-1.0'"),
                                           ({"forces": float("nan")}, "expected a non-negative number, got 'nan'")])
def test_uncertainty_scale_of_a_model_is_checked(tmp_path, scale, message):
    d = _model(tmp_path / "m")
    (d / "uncertainty.json").write_text(json.dumps({"scale": scale}))
    with pytest.raises(MlipopsError) as exc:
        MlipopsCalculator(d)
    assert message in _one_line(exc, d / "uncertainty.json", f"scale.{next(iter(scale))}")


def test_a_good_model_still_loads_everywhere(tmp_path):
    """Control: the checks pass a model as train saves it (ensemble, D2 term, built-in baseline)."""
    from mlipops.models.dispersion import d2_settings
    from mlipops.models.schema import parameter_count

    torch.manual_seed(1)
    members = [Potential(["Cu", "Mo"], D, [6, 6], d2_settings(["Cu", "Mo"]),
                         {"calculator": "ase.calculators.emt.EMT", "kwargs": {}}) for _ in range(2)]
    Ensemble(members).save(tmp_path / "ens", extra={"model_name": "cu", "dtype": "float64", "mlflow_run_id": None,
                                                    "trained_on": {"path": "x"}, "members": [{"seed": 0}]})
    m = load_model(tmp_path / "ens")
    assert isinstance(m, Ensemble) and len(m) == 2
    for a, b in zip(m.state_dict().values(), Ensemble(members).state_dict().values()):
        assert torch.equal(a, b.to(a.dtype))
    assert np.isfinite(_energy(MlipopsCalculator(tmp_path / "ens")))
    # the size bound counts what the model holds: its parameters, no more than its state dict
    n = parameter_count(2, D, [6, 6], 2)
    assert sum(p.numel() for p in m.parameters()) < n <= sum(t.numel() for t in m.state_dict().values())
