"""The pipeline's contract: every stage's data inputs, outputs and params sections, declared once.

A stage's code learns where its inputs lie and where its outputs go from here, never by importing the
upstream stage that writes them (``evaluate`` reads the models from :data:`MODELS_DIR`, not from
``mlipops.train``). Paths are relative to the project root, the working directory of every stage.

:data:`STAGES` declares, per DVC stage, its command, the data it reads, the params sections it reads and
what it writes (cached outputs, uncached reports, metrics, plots). ``tests/test_pipeline_contract.py``
checks ``dvc.yaml`` against it (every stage, every data dep, out, metric, plot and params key; the code deps
are checked by ``tests/test_dvc_contract.py`` from each command's import closure), and that no module but
this one spells a path under ``data/`` or ``reports/``; ``tests/test_e2e.py`` traces the params keys each
stage command reads and fails on one its params (or its :data:`UNTRACKED` keys, each with a reason) do not
cover. A ``${section.key}`` in a path is DVC's interpolation of params.yaml; :data:`FROM_PARAMS` marks inputs
listed by params (``ingest.sources``).

This module imports nothing of the package: every stage may import it without pulling in another's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------------------- data and its stages

RAW_DIR = Path("data/raw")  # generate, bo_scan and active write raw frames here; ingest reads ingest.sources
INGESTED_DIR = Path("data/ingested")
INGESTED = INGESTED_DIR / "frames.extxyz"  # every frame that parsed, with its split
INGEST_REJECTED = INGESTED_DIR / "rejected.parquet"  # frames that did not parse, with the reason

CURATED_DIR = Path("data/curated")
ACCEPTED = CURATED_DIR / "accepted.extxyz"  # the curated frames: what train, index and evaluate read
QUARANTINE = CURATED_DIR / "quarantine.parquet"  # every frame kept out, with check and reason (never deleted)
# the training frames' per-atom descriptors, which the outlier surrogate is made of, saved for the index
# (mlipops.descriptors.SavedDescriptorsWriter): keyed to accepted.extxyz's md5, so never taken for other data
TRAINING_DESCRIPTORS = CURATED_DIR / "training_descriptors"
RELEASES = Path("data/quarantine_releases.yaml")  # the user's reviewed releases from quarantine (validate reads)

INDEX = Path("data/index.duckdb")  # the coverage and hull index (DuckDB)

MODELS_DIR = Path("data/models")  # data/models/<train.model_name>: the trained ensemble
CHECKPOINT_DIR = Path("data/checkpoints")  # the members' checkpoints (a killed training resumes from them)
BASELINE_CACHE = Path("data/cache/baseline")  # the Δ-learning baseline's energies per frame, by content hash

ACTIVE_WORK_DIR = Path("data/active")  # the campaign's state, snapshots, labels, models (active.work_dir's default)

MELTING_REFERENCE_DIR = Path("data/melting")  # the reference oracle's melting point (expensive, cached by DVC)
MELTING_REFERENCE = MELTING_REFERENCE_DIR / "reference.json"
MELTING_REFERENCE_PHASES = MELTING_REFERENCE_DIR / "reference_phases.extxyz"

# ------------------------------------------------------------------------------------------------- reports

REPORTS = Path("reports")
GENERATE_REPORTS = REPORTS / "generate"
BO_SCAN_REPORTS = GENERATE_REPORTS / "bo_scan"
INGEST_REPORTS = REPORTS / "ingest"
VALIDATE_REPORTS = REPORTS / "validate"
INDEX_REPORTS = REPORTS / "index"
TRAIN_REPORTS = REPORTS / "train"
LEARNING_CURVE_CSV = TRAIN_REPORTS / "plots" / "learning_curve.csv"  # per epoch, the members' mean MAEs (DVC plot)
EVALUATE_REPORTS = REPORTS / "evaluate"
PARITY_CSV_DIR = EVALUATE_REPORTS / "parity"  # <split>_energy.csv, <split>_forces.csv: parity data (DVC plots)
PATHS_JSON = EVALUATE_REPORTS / "reaction_paths.json"  # reaction paths followed to the hull's exit point
PATHS_REPORTS = EVALUATE_REPORTS / "paths"
UNCERTAINTY_REPORTS = EVALUATE_REPORTS / "uncertainty"  # ensemble σ ranked and calibrated (the evaluate stage)
DEFECTS_REPORTS = EVALUATE_REPORTS / "defects"
MELTING_REPORTS = EVALUATE_REPORTS / "melting"
MELTING_POINT_JSON = MELTING_REPORTS / "melting_point.json"
MELTING_SWEEP_REPORTS = EVALUATE_REPORTS / "melting_sweep"  # `mlipops evaluate melting --sweep` (on demand)
MELTING_BRACKET_REPORTS = EVALUATE_REPORTS / "melting_bracket"  # `mlipops evaluate melting-bracket` (on demand)
NVE_REPORTS = EVALUATE_REPORTS / "nve"
PROMOTE_REPORTS = REPORTS / "promote"
HEADLINE_JSON = PROMOTE_REPORTS / "headline.json"  # the headline metrics of every stage (mlipops.headline), flat
ACTIVE_REPORTS = REPORTS / "active"

# ------------------------------------------------------------------------------------------------- the stages

FROM_PARAMS = "<ingest.sources>"  # ingest reads each source file of params.yaml's ingest.sources (and its provenance)
MODEL = f"{MODELS_DIR.as_posix()}/${{train.model_name}}"


def _p(*paths: Path | str) -> tuple[str, ...]:
    return tuple(p.as_posix() if isinstance(p, Path) else p for p in paths)


@dataclass(frozen=True)
class Stage:
    """One DVC stage: ``cmd`` (an ``mlipops`` command), the data it reads (``reads``), its params keys, and what
    it writes: ``outs`` (cached by DVC), ``persist`` (cached outs DVC keeps in place while the stage runs),
    ``reports`` (outs with ``cache: false``), ``metrics`` and ``plots`` (uncached). Its code deps are not
    declared: they are its command's import closure (tests/test_dvc_contract.py)."""

    cmd: str
    entry: str  # "module:function" the command runs: the stage's code starts there (always a ``run``)
    params: tuple[str, ...]
    reads: tuple[str, ...] = ()
    untracked: tuple[str, ...] = ()  # params keys read that are not deps, each for a reason of UNTRACKED
    outs: tuple[str, ...] = ()
    persist: tuple[str, ...] = ()
    reports: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()

    def writes(self) -> tuple[str, ...]:
        return self.outs + self.persist + self.reports + self.metrics + self.plots


# params keys a stage reads that are, by design, not its DVC params (changing one does not re-run it): the
# reason of each. tests/test_e2e.py traces the keys every stage command reads (mlipops.params.trace_reads) and
# fails on one neither its params nor this list cover.
UNTRACKED = {
    "compute": "where Dask runs the work (a local cluster's size, a scheduler address): not what it computes",
    "train.device": "where a fit runs (CPU or CUDA): the same model to rounding",
    "train.precompute_descriptors": "how the descriptor Jacobians are had (precomputed or by autograd): the same "
                                    "model to rounding (tests/test_training.py)",
    "train.tracking_uri": "where MLflow records the run",
    "train.experiment": "where MLflow records the run",
    "train.artifact_location": "where MLflow records the run",
    "train.baseline.calculator": "the allowlist of calculators a model folder may name (models.schema."
                                 "trusted_calculators): whether a model loads, not what it predicts; train, which "
                                 "uses it, tracks it",
}
_TRACKING = ("train.tracking_uri", "train.experiment", "train.artifact_location")

_E, _U, _D, _M, _N = EVALUATE_REPORTS, UNCERTAINTY_REPORTS, DEFECTS_REPORTS, MELTING_REPORTS, NVE_REPORTS

# the train keys that change a fitted model's result (not epochs, ensemble size, tracking): the defects stage
# trains its own perfect-crystal model and its control with them
FIT_KEYS = ("seed", "hidden", "batch_size", "learning_rate", "optimizer", "scheduler", "weight_decay",
            "energy_weight", "force_weight", "stress_weight", "patience", "dtype", "dispersion", "baseline")
# the melting keys the oracle's reference reads (not member_seeds, window_K, sweep; not compute)
MELTING_PRESET_KEYS = ("supercell", "melt_steps", "equilibration_steps", "production_steps",
                       "max_production_steps", "reference_seeds", "require_agreement")
MELTING_REFERENCE_KEYS = ("element", "lattice", "reference", "t_guess", "timestep_fs", "q6_solid_threshold",
                          "calibration_steps", "liquid_volume_change", "min_phase_fraction", "max_retries",
                          "retry_step_K", "ensemble", "window_fraction", "drift_sigma", "start_offset",
                          "agree_sigma", "phase_steps", "phase_snapshots", "seed")
ELEMENT_KEYS = ("generate.element", "crystal.element", "crystal.lattice", "validate.allowed_species")

STAGES: dict[str, Stage] = {
    "generate": Stage(
        cmd="mlipops generate", entry="mlipops.generate.recipes:run", params=("generate",),
        outs=_p(f"{RAW_DIR.as_posix()}/${{generate.name}}.extxyz",
                f"{RAW_DIR.as_posix()}/${{generate.name}}.extxyz.provenance.json"),
        reports=_p(GENERATE_REPORTS / "summary.md"), metrics=_p(GENERATE_REPORTS / "metrics.json")),
    "bo_scan": Stage(
        cmd="mlipops generate bo-scan", entry="mlipops.generate.bo_aware:run", params=("bo_scan",),
        outs=_p(f"{RAW_DIR.as_posix()}/bo_scan_${{bo_scan.name}}.extxyz",
                f"{RAW_DIR.as_posix()}/bo_scan_${{bo_scan.name}}.extxyz.provenance.json"),
        reports=_p(BO_SCAN_REPORTS / "summary.md", BO_SCAN_REPORTS / "gap_curve.csv"),
        metrics=_p(BO_SCAN_REPORTS / "metrics.json"), plots=_p(BO_SCAN_REPORTS / "gap.png")),
    "ingest": Stage(
        cmd="mlipops ingest", entry="mlipops.ingest:run", params=("ingest",), reads=(FROM_PARAMS,),
        outs=_p(INGESTED, INGEST_REJECTED),
        reports=_p(INGEST_REPORTS / "summary.md"), metrics=_p(INGEST_REPORTS / "metrics.json")),
    "validate": Stage(
        cmd="mlipops validate", entry="mlipops.quality.validate:run",
        params=("validate", "descriptors", "ingest.sources"),
        reads=_p(INGESTED, INGEST_REJECTED, RELEASES),
        outs=_p(ACCEPTED, QUARANTINE, TRAINING_DESCRIPTORS),
        reports=_p(VALIDATE_REPORTS / "summary.md", VALIDATE_REPORTS / "validation_result.json",
                   VALIDATE_REPORTS / "outliers.csv"),
        metrics=_p(VALIDATE_REPORTS / "metrics.json"), plots=_p(VALIDATE_REPORTS / "cooks_distance.png")),
    "index": Stage(
        cmd="mlipops index", entry="mlipops.index.build:run", params=("index", "descriptors"),
        reads=_p(ACCEPTED, QUARANTINE, TRAINING_DESCRIPTORS),
        # the index is built beside the old one and renamed over it: a failed rebuild leaves the old one
        persist=_p(INDEX), reports=_p(INDEX_REPORTS / "coverage.md"), metrics=_p(INDEX_REPORTS / "metrics.json"),
        plots=_p(INDEX_REPORTS / "projection.png", INDEX_REPORTS / "gamma_histogram.png")),
    "train": Stage(
        cmd="mlipops train", entry="mlipops.train.run:run", params=("train", "descriptors"), untracked=("compute",),
        reads=_p(ACCEPTED),
        outs=(MODEL,), reports=_p(TRAIN_REPORTS / "summary.md", LEARNING_CURVE_CSV),
        metrics=_p(TRAIN_REPORTS / "metrics.json"),
        plots=_p(TRAIN_REPORTS / "learning_curve.png", TRAIN_REPORTS / "parity_energy.png",
                 TRAIN_REPORTS / "parity_forces.png")),
    "evaluate": Stage(
        cmd="mlipops evaluate",
        entry="mlipops.evaluate.stage:run",
        params=("evaluate.splits", "evaluate.uncertainty", "evaluate.paths", "train.model_name"),
        untracked=("train.baseline.calculator",),
        reads=(MODEL, *_p(ACCEPTED, INDEX)),
        reports=_p(_E / "summary.md", PATHS_JSON, _U / "summary.md", _U / "uncertainty.json",
                   _E / "provenance.json", _U / "provenance.json",
                   *(PARITY_CSV_DIR / f"{s}_{q}.csv" for s in ("val", "test") for q in ("energy", "forces"))),
        metrics=_p(_E / "metrics.json", _U / "metrics.json"),
        plots=_p(_E / "parity_val_energy.png", _E / "parity_val_forces.png", _E / "parity_test_energy.png",
                 _E / "parity_test_forces.png", PATHS_REPORTS, _U / "sigma_vs_error.png",
                 _U / "calibration.png")),
    "defects": Stage(
        cmd="mlipops evaluate defects",
        entry="mlipops.evaluate.defects:run",
        params=("evaluate.defects", "crystal", "descriptors", "index.coordination_cutoff", "index.pca_components",
                "generate.element", "generate.oracle", "generate.defects", "generate.liquid",
                *(f"train.{k}" for k in FIT_KEYS)),
        untracked=("train.device", "train.precompute_descriptors", *_TRACKING),
        reads=_p(ACCEPTED),
        reports=_p(_D / "summary.md", _D / "defects.json", _D / "provenance.json"),
        metrics=_p(_D / "metrics.json"),
        plots=_p(_D / "force_error_vs_geometry.png", _D / "decomposition.png")),
    "melting_reference": Stage(
        cmd="mlipops evaluate melting --reference",
        entry="mlipops.evaluate.melting_reference:run",
        params=("evaluate.melting.preset",
                *(f"evaluate.melting.{p}.{k}" for p in ("quick", "production") for k in MELTING_PRESET_KEYS),
                *(f"evaluate.melting.{k}" for k in MELTING_REFERENCE_KEYS),
                "generate.element", "crystal.element", "crystal.lattice", "validate.allowed_species",
                "generate.oracle"),
        untracked=("compute",),
        outs=_p(MELTING_REFERENCE, MELTING_REFERENCE_PHASES)),
    "melting": Stage(
        cmd="mlipops evaluate melting",
        entry="mlipops.evaluate.melting_stage:run",
        params=("evaluate.melting", *ELEMENT_KEYS, "train.model_name"),
        untracked=("compute", "train.baseline.calculator"),
        reads=(MODEL, *_p(MELTING_REFERENCE, MELTING_REFERENCE_PHASES, INDEX)),
        reports=_p(_M / "summary.md", MELTING_POINT_JSON, _M / "provenance.json"),
        metrics=_p(_M / "metrics.json"),
        plots=_p(_M / "distribution.png", _M / "traces_members.png", _M / "traces_reference.png")),
    "nve": Stage(
        cmd="mlipops evaluate nve", entry="mlipops.evaluate.nve:run",
        params=("evaluate.nve", "crystal", "generate.oracle", "train.model_name"),
        untracked=("train.baseline.calculator",),
        reads=(MODEL, *_p(ACCEPTED)),
        reports=_p(_N / "summary.md", _N / "provenance.json"), metrics=_p(_N / "metrics.json"),
        plots=_p(_N / "energy.png")),
    "promote": Stage(
        cmd="mlipops promote", entry="mlipops.promote.registry:run", params=("promote", "train.model_name"),
        untracked=("train.baseline.calculator",),
        reads=(MODEL, *_p(TRAIN_REPORTS / "metrics.json", _E / "metrics.json", _E / "provenance.json", PATHS_JSON,
                          _U / "uncertainty.json",
                          _U / "metrics.json", _U / "provenance.json", _D / "defects.json", _D / "metrics.json",
                          _D / "provenance.json", MELTING_POINT_JSON, _M / "metrics.json", _M / "provenance.json",
                          _N / "metrics.json", _N / "provenance.json", INDEX)),
        # the registry folder is promote.registry_dir (default "registry"), written through mlipops.paths' guard
        persist=("registry",), reports=_p(PROMOTE_REPORTS / "decision.md", PROMOTE_REPORTS / "gates.json"),
        metrics=_p(PROMOTE_REPORTS / "metrics.json", HEADLINE_JSON)),
    "active": Stage(
        cmd="mlipops active run",
        entry="mlipops.active.loop:run",
        params=("active", "crystal", "train", "descriptors", "ingest.split", "validate", "index", "generate.oracle"),
        reads=(MODEL, *_p(ACCEPTED, QUARANTINE, INDEX)),
        # active.out_dir and active.work_dir (params; their defaults)
        persist=_p(RAW_DIR / "active", ACTIVE_WORK_DIR), reports=_p(ACTIVE_REPORTS / "summary.md"),
        metrics=_p(ACTIVE_REPORTS / "metrics.json"), plots=_p(ACTIVE_REPORTS / "learning_curve.png")),
}


# ------------------------------------------------------------------------------------- DVC data plots (CSV)


@dataclass(frozen=True)
class DataPlot:
    """One plot of ``dvc.yaml``'s top-level ``plots``: a CSV a stage writes (one of its uncached ``reports``),
    its x column and y columns, so that ``dvc plots show`` draws it and ``dvc plots diff A B`` overlays two
    commits. The stage writes exactly these columns (their names carry the units);
    ``tests/test_pipeline_contract.py`` checks ``dvc.yaml`` against this declaration."""

    file: str
    x: str
    y: tuple[str, ...]
    template: str
    title: str
    x_label: str
    y_label: str

    def dvc(self) -> dict:
        """The plot's definition as ``dvc.yaml`` spells it."""
        return {"template": self.template, "title": self.title, "x": self.x,
                "y": {self.file: list(self.y) if len(self.y) > 1 else self.y[0]},
                "x_label": self.x_label, "y_label": self.y_label}


LEARNING_CURVE_COLUMNS = ("epoch", "train_force_mae_meV_per_A", "val_force_mae_meV_per_A",
                          "train_energy_mae_meV_per_atom", "val_energy_mae_meV_per_atom")
PARITY_COLUMNS = {"energy": ("reference_eV_per_atom", "predicted_eV_per_atom"),
                  "forces": ("reference_eV_per_A", "predicted_eV_per_A")}


def _parity(split: str, q: str) -> DataPlot:
    ref, pred = PARITY_COLUMNS[q]
    what = "energy per atom (eV/atom)" if q == "energy" else "force component (eV/Å)"
    return DataPlot((PARITY_CSV_DIR / f"{split}_{q}.csv").as_posix(), ref, (pred,), "scatter",
                    f"{split} {q}: predicted vs reference (ensemble mean)", f"reference {what}",
                    f"predicted {what}")


DATA_PLOTS = {
    "learning_curve_forces": DataPlot(LEARNING_CURVE_CSV.as_posix(), "epoch", LEARNING_CURVE_COLUMNS[1:3], "linear",
                                      "force MAE per epoch (mean over the members)", "epoch", "force MAE (meV/Å)"),
    "learning_curve_energy": DataPlot(LEARNING_CURVE_CSV.as_posix(), "epoch", LEARNING_CURVE_COLUMNS[3:5], "linear",
                                      "energy MAE per epoch (mean over the members)", "epoch",
                                      "energy MAE (meV/atom)"),
    **{f"parity_{s}_{q}": _parity(s, q) for s in ("val", "test") for q in ("energy", "forces")},
}
