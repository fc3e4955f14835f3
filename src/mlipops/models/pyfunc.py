"""An mlipops model as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/cu@champion").predict(df)``.

Logged from code (MLflow's models-from-code: :data:`ENTRY`, a three-line script, is the model's code; nothing is
pickled) with the model's files as its one artifact (``weights.pt``, ``config.json`` and the σ recalibration
``uncertainty.json``), which :class:`MlipopsModel` loads through :class:`~mlipops.models.MlipopsCalculator`:
``torch.load(weights_only=True)`` and a JSON config, the same checked path as everywhere else.

Input, one structure per row (a pandas DataFrame, or the ``dataframe_split`` JSON of ``mlflow models serve``):

* ``extxyz``: the structure as extended-XYZ text (one frame), or
* ``numbers`` (atomic numbers), ``positions`` (Å, [n][3]), and optionally ``cell`` (Å, [3][3]) and ``pbc``
  ([3] booleans; default all periodic when a cell is given).

Output, one row per structure: ``energy`` (eV), ``energy_std`` (eV, the committee's σ, recalibrated),
``forces`` (eV/Å, [n][3]), ``forces_std`` (eV/Å, [n][3]), ``n_atoms``. A row that cannot be read is an
``MlflowException``-free ``ValueError`` naming the row and the field.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mlipops.errors import StageInputError

ENTRY = Path(__file__).with_name("pyfunc_entry.py")  # the models-from-code script MLflow stores and runs
PAYLOAD = ("weights.pt", "config.json", "uncertainty.json")  # what the model needs; the rest stays in the run
ARTIFACT = "model"


def signature():
    """The pyfunc's signature: structures in (extxyz text or arrays, every column optional), predictions out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    vec = Array("double")
    inputs = Schema([ColSpec("string", "extxyz", required=False), ColSpec(Array("long"), "numbers", required=False),
                     ColSpec(Array(vec), "positions", required=False), ColSpec(Array(vec), "cell", required=False),
                     ColSpec(Array("boolean"), "pbc", required=False)])
    outputs = Schema([ColSpec("double", "energy"), ColSpec("double", "energy_std", required=False),
                      ColSpec(Array(vec), "forces"), ColSpec(Array(vec), "forces_std", required=False),
                      ColSpec("long", "n_atoms")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _row_atoms(k: int, row: dict):
    """The structure of input row ``k``; ValueError naming the row and field."""
    from ase import Atoms
    from ase.io import read

    text = row.get("extxyz")
    if isinstance(text, str) and text.strip():
        try:
            frames = read(io.StringIO(text), index=":", format="extxyz")
        except Exception as exc:  # noqa: BLE001 - ASE's parser raises many types
            raise ValueError(f"row {k}, field extxyz: not extended XYZ ({type(exc).__name__}: {exc})") from None
        if len(frames) != 1:
            raise ValueError(f"row {k}, field extxyz: one structure per row (got {len(frames)})")
        return frames[0]
    numbers, positions = row.get("numbers"), row.get("positions")
    if numbers is None or positions is None:
        raise ValueError(f"row {k}: give `extxyz`, or `numbers` and `positions`")
    try:
        z = np.asarray(list(numbers), dtype=int)
        pos = np.asarray([list(p) for p in positions], dtype=float)
        cell = row.get("cell")
        cell = None if cell is None else np.asarray([list(c) for c in cell], dtype=float)
        pbc = row.get("pbc")
        pbc = (cell is not None) if pbc is None else [bool(b) for b in pbc]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"row {k}, fields numbers/positions/cell/pbc: {exc}") from None
    if pos.shape != (len(z), 3) or (cell is not None and cell.shape != (3, 3)):
        raise ValueError(f"row {k}: positions must be [n_atoms][3] for {len(z)} numbers"
                         + ("" if cell is None else ", cell [3][3]") + f" (got {pos.shape})")
    if not np.isfinite(pos).all():
        raise ValueError(f"row {k}, field positions: non-finite values")
    return Atoms(numbers=z, positions=pos, cell=cell, pbc=pbc)


class MlipopsModel:
    """The pyfunc's Python model (created by :data:`ENTRY`; subclassing MLflow's ``PythonModel`` at runtime
    keeps this module importable without MLflow)."""

    def load_context(self, context):
        from mlipops.models.calculator import MlipopsCalculator

        self.calc = MlipopsCalculator(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        rows = []
        for k, row in enumerate(df.to_dict("records")):
            row = {key: (None if v is None or (isinstance(v, float) and np.isnan(v)) else v) for key, v in row.items()}
            atoms = _row_atoms(k, row)
            atoms.calc = self.calc
            out = {"energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces().tolist(),
                   "n_atoms": len(atoms)}
            if self.calc.is_ensemble:
                out |= {"energy_std": float(self.calc.results["energy_std"]),
                        "forces_std": np.asarray(self.calc.results["forces_std"]).tolist()}
            rows.append(out)
        return pd.DataFrame(rows, columns=["energy", "energy_std", "forces", "forces_std", "n_atoms"])


def input_example(model_dir: Path | str):
    """Two atoms of the model's first species 2.5 Å apart in an open 12 Å box, as extxyz text: the example MLflow
    stores with the model (and its UI and ``mlflow models serve`` show)."""
    import pandas as pd
    from ase import Atoms
    from ase.io import write

    species = json.loads((Path(model_dir) / "config.json").read_text()).get("species") or ["H"]
    atoms = Atoms([species[0]] * 2, positions=[[5.0, 6.0, 6.0], [7.5, 6.0, 6.0]], cell=[12.0] * 3, pbc=False)
    text = io.StringIO()
    write(text, atoms, format="extxyz")
    return pd.DataFrame({"extxyz": [text.getvalue()]})


def requirements() -> list[str]:
    """The serving environment's packages, at the versions this model was logged with."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "ase", "numpy", "pandas", "mlflow", "mlipops"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def log_pyfunc(model_dir: Path | str, sigma_scale_json: Path | str | None = None, name: str = "pyfunc",
               run_id: str | None = None, tags: dict | None = None):
    """Log the model in ``model_dir`` (and its σ recalibration, when given) as a pyfunc of the active MLflow run
    (or ``run_id``); returns MLflow's ``ModelInfo`` (``model_id``, ``model_uri``)."""
    import mlflow

    src = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="mlipops-pyfunc-") as tmp:
        payload = Path(tmp) / ARTIFACT
        payload.mkdir()
        for f in PAYLOAD:
            if (src / f).is_file():
                shutil.copy2(src / f, payload / f)
            elif f != "uncertainty.json":
                raise StageInputError("model file missing: not a model folder", file=str(src / f))
        if sigma_scale_json is not None and Path(sigma_scale_json).is_file():
            scale = json.loads(Path(sigma_scale_json).read_text()).get("scale") or {}
            (payload / "uncertainty.json").write_text(json.dumps({"scale": scale}, indent=2) + "\n")
        kwargs = {"name": name, "python_model": str(ENTRY), "artifacts": {ARTIFACT: str(payload)},
                  "signature": signature(), "input_example": input_example(payload),
                  "pip_requirements": requirements(), "tags": tags}
        if run_id is not None:
            with mlflow.start_run(run_id=run_id):
                return mlflow.pyfunc.log_model(**kwargs)
        return mlflow.pyfunc.log_model(**kwargs)
