"""Warm-started retraining of the committee between active-learning iterations.

Every member starts from its own weights of the last iteration (the same architecture, feature
standardisation and reference energies: nothing is re-initialised) and trains ``active.retrain.epochs``
epochs at ``active.retrain.learning_rate`` on the campaign's curated data, with its own bootstrap
resample, through :func:`mlipops.train.run.train_ensemble` (Dask, resumable checkpoints, the best
validation epoch kept). Loss weights, batch size, optimizer and scheduler come from ``train``; the
architecture (hidden layers, descriptors, dtype, baseline, dispersion) comes from the model itself, so a
registry model whose settings differ from params.yaml still warm-starts.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

from mlipops.errors import StageInputError
from mlipops.frames import file_md5
from mlipops.params import DescriptorParams, Params, TrainParams
from mlipops.paths import safe_remove


def warm_start_settings(model_dir: str | Path,
                        p: Params) -> tuple[TrainParams, DescriptorParams, list[str], list[dict]]:
    """(train params, descriptor params, species, per-member state dicts) to continue training the
    model in ``model_dir``. Raises :class:`StageInputError` when params.yaml's baseline or dispersion
    term differs from the model's (the warm start would learn another target)."""
    from mlipops.models.ensemble import Ensemble, load_model, read_config
    from mlipops.models.potential import Potential
    from mlipops.models.schema import trusted_calculators
    from mlipops.train.loop import DTYPES, make_potential

    model_dir = Path(model_dir)
    trusted = trusted_calculators(p)
    cfg = read_config(model_dir, trusted)
    dtype = cfg.get("dtype", "float32")
    if dtype not in DTYPES:
        raise StageInputError(f"unknown model dtype {dtype!r}", file=str(model_dir / "config.json"), field="dtype")
    model = load_model(model_dir, dtype=DTYPES[dtype], trusted_calculators=trusted)
    members = model.members if isinstance(model, Ensemble) else [model]
    r = p.active.retrain
    tp = p.train.model_copy(update={
        "hidden": list(cfg["hidden"]), "dtype": dtype, "epochs": r.epochs, "learning_rate": r.learning_rate,
        "patience": r.patience, "curriculum": [],
        "ensemble": p.train.ensemble.model_copy(update={"members": len(members)})})
    d = DescriptorParams.model_validate(cfg["descriptor"])
    species = list(cfg["species"])
    proto: Potential = make_potential(species, tp, d)
    for key in ("baseline", "dispersion"):
        mine = proto.config()[key]
        theirs = members[0].config()[key]
        if json.dumps(mine, sort_keys=True, default=str) != json.dumps(theirs, sort_keys=True, default=str):
            raise StageInputError(f"the model's {key} term ({theirs}) differs from params.yaml train ({mine}): "
                                  "a warm start would learn another target; align train."
                                  f"{key} with the model", file=str(model_dir / "config.json"), field=key)
    states = [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in members]
    return tp, d, species, states


def retrain(model_dir: str | Path, data_path: str | Path, p: Params, out_dir: str | Path,
            checkpoint_dir: str | Path, run_ids: list[str] | None = None, tracking_uri: str | None = None) -> dict:
    """Warm-start every member of ``model_dir`` on ``data_path`` (curated extxyz with splits); save the new
    ensemble to ``out_dir`` (written in a temporary folder, then renamed). Returns metrics: ``val`` and
    ``train`` errors of the ensemble mean, per-member best epochs, wall time. An interrupted call
    resumes from ``checkpoint_dir``."""
    import shutil

    from mlipops.frames import read_extxyz
    from mlipops.train.loop import DTYPES, evaluate_split, prepare, species_of

    train_run = importlib.import_module("mlipops.train.run")
    t0 = time.perf_counter()
    data_path, out_dir = Path(data_path), Path(out_dir)
    tp, d, species, states = warm_start_settings(model_dir, p)
    frames, _ = read_extxyz(data_path)
    extra = sorted(set(species_of(frames)) - set(species))
    if extra:
        raise StageInputError(f"the data has species {extra} the model does not know: a warm start cannot add "
                              "species (train a new model)", file=str(data_path), field="species")
    init_md5 = file_md5(Path(model_dir) / "weights.pt")
    key = hashlib.sha256(json.dumps([train_run.run_fingerprint(tp, d, file_md5(data_path)), init_md5]).encode()
                         ).hexdigest()[:16]
    ensemble, members, timing = train_run.train_ensemble(
        data_path, species, tp, d, p.compute, checkpoint_dir=checkpoint_dir, key=key, tracking_uri=tracking_uri,
        run_ids=run_ids, init_states=states)
    dtype = DTYPES[tp.dtype]
    splits = {"train": [a for a in frames if a.info.get("split") == "train"],
              "val": [a for a in frames if a.info.get("split") == "val"]}
    metrics = {}
    for s, fr in splits.items():
        if fr:
            m = evaluate_split(ensemble, prepare(ensemble.members[0], fr), dtype)
            metrics |= {f"{s}.{k}": v for k, v in m.items() if k != "by_config"}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    safe_remove(tmp, ignore_errors=True)
    ensemble.save(tmp, extra={"model_name": Path(model_dir).name, "dtype": tp.dtype,
                              "trained_on": {"path": str(data_path), "dvc_md5": file_md5(data_path)},
                              "warm_started_from": {"path": str(model_dir), "weights_md5": init_md5},
                              "members": [{"seed": tp.seed + r["member"], "best_epoch": r["best_epoch"],
                                           "n_train": r["n_train"], "n_train_unique": r["n_train_unique"]}
                                          for r in members]})
    sigma = Path(model_dir) / "uncertainty.json"
    if sigma.is_file():  # the σ recalibration of the seed model stays a fair first guess
        shutil.copy2(sigma, tmp / "uncertainty.json")
    safe_remove(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    safe_remove(checkpoint_dir, ignore_errors=True)
    return metrics | {"best_epochs": [r["best_epoch"] for r in members], "epochs": tp.epochs,
                      "n_members": len(members), "wall_time_s": round(time.perf_counter() - t0, 2),
                      "time.members_s": round(timing.get("members", 0.0), 2)}
