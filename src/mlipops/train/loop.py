"""Training loop: energy + force loss, Adam with cosine decay, best-on-validation weights, MLflow."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from mlipops.errors import StageInputError
from mlipops.frames import labels, read_extxyz
from mlipops.models.potential import Graph, Potential
from mlipops.params import DescriptorParams, TrainParams, flatten
from mlipops.report import progress, write_markdown, write_metrics
from mlipops.train import tracking

DATA = Path("data/curated/accepted.extxyz")
MODELS_DIR = Path("data/models")
REPORT_DIR = Path("reports/train")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Prepared:
    graphs: list[Graph]
    energy: np.ndarray  # [n_frames] eV
    forces: list[np.ndarray]
    n_atoms: np.ndarray


@dataclass
class TrainResult:
    model: Potential
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)


def prepare(model: Potential, frames: list[Atoms]) -> Prepared:
    graphs, energy, forces = [], [], []
    for a in frames:
        e, f, _ = labels(a)
        graphs.append(model.graph(a))
        energy.append(e)
        forces.append(f)
    return Prepared(graphs, np.array(energy, dtype=float), forces,
                    np.array([len(g.species) for g in graphs]))


def fit_reference_energies(model: Potential, data: Prepared) -> np.ndarray:
    """E0 per species: least squares of total energies on species counts."""
    counts = np.stack([np.bincount(g.species, minlength=len(model.species)) for g in data.graphs]).astype(float)
    e0, *_ = np.linalg.lstsq(counts, data.energy, rcond=None)
    return e0


@torch.no_grad()
def feature_statistics(model: Potential, data: Prepared, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    feats = []
    for k in range(0, len(data.graphs), 32):
        b = Potential.collate(data.graphs[k:k + 32], dtype)
        feats.append(model.features(b, b["positions"], b["cell"]))
    g = torch.cat(feats)
    std = g.std(0)
    return g.mean(0), torch.where(std > 1e-8 * (g.abs().mean(0) + 1e-12), std, torch.ones_like(std))


def _batches(n: int, size: int, rng: np.random.Generator | None):
    idx = rng.permutation(n) if rng is not None else np.arange(n)
    return [idx[k:k + size] for k in range(0, n, size)]


def _targets(data: Prepared, idx, dtype):
    e = torch.as_tensor(data.energy[idx], dtype=dtype)
    f = torch.as_tensor(np.concatenate([data.forces[k] for k in idx]), dtype=dtype)
    n = torch.as_tensor(data.n_atoms[idx], dtype=dtype)
    return e, f, n


def evaluate_split(model: Potential, data: Prepared, dtype, batch_size: int = 16) -> dict[str, float]:
    """Energy-per-atom and force-component MAE/RMSE of ``model`` on prepared frames."""
    de, df = [], []
    for idx in _batches(len(data.graphs), batch_size, None):
        b = Potential.collate([data.graphs[k] for k in idx], dtype)
        out = model(b, forces=True)
        e, f, n = _targets(data, idx, dtype)
        de.append(((out["energy"].detach() - e) / n).numpy())
        df.append((out["forces"].detach() - f).numpy().ravel())
    de, df = np.concatenate(de), np.concatenate(df)
    return {"energy_mae_per_atom": float(np.mean(np.abs(de))),
            "energy_rmse_per_atom": float(np.sqrt(np.mean(de**2))),
            "force_mae": float(np.mean(np.abs(df))), "force_rmse": float(np.sqrt(np.mean(df**2)))}


def fit(train: list[Atoms], val: list[Atoms], p: TrainParams, d: DescriptorParams,
        log=None) -> TrainResult:
    """Train a potential on ``train``, keep the weights with the best validation loss."""
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed)
    dtype = DTYPES[p.dtype]
    species = sorted({s for a in train + val for s in a.get_chemical_symbols()},
                     key=lambda s: Atoms(s).numbers[0])
    model = Potential(species, d.model_dump(), p.hidden).to(dtype)
    tr, va = prepare(model, train), prepare(model, val)
    model.e0.copy_(torch.as_tensor(fit_reference_energies(model, tr), dtype=dtype))
    mean, std = feature_statistics(model, tr, dtype)
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    opt = torch.optim.Adam(model.parameters(), lr=p.learning_rate, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=p.learning_rate / 20)
    result = TrainResult(model)
    best, best_state = float("inf"), None
    with progress("training", p.epochs) as bar:
        for epoch in range(1, p.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            abs_e, abs_f, n_f = 0.0, 0.0, 0
            for idx in _batches(len(tr.graphs), p.batch_size, rng):
                b = Potential.collate([tr.graphs[k] for k in idx], dtype)
                e, f, n = _targets(tr, idx, dtype)
                out = model(b, forces=True, create_graph=True)
                de = (out["energy"] - e) / n
                dfor = out["forces"] - f
                loss = p.energy_weight * (de**2).mean() + p.force_weight * (dfor**2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                abs_e += float(de.detach().abs().sum())
                abs_f += float(dfor.detach().abs().sum())
                n_f += dfor.numel()
            sched.step()
            model.eval()
            row = {"epoch": epoch, "train_energy_mae_per_atom": abs_e / len(tr.graphs),
                   "train_force_mae": abs_f / max(n_f, 1), "lr": opt.param_groups[0]["lr"]}
            if va.graphs:
                m = evaluate_split(model, va, dtype)
                row.update({f"val_{k}": v for k, v in m.items()})
                score = p.energy_weight * m["energy_rmse_per_atom"] ** 2 + p.force_weight * m["force_rmse"] ** 2
            else:
                score = -epoch  # no validation split: keep the last epoch
            row["epoch_time_s"] = time.perf_counter() - t0
            if not np.isfinite(score):
                raise StageInputError(f"training diverged at epoch {epoch} (non-finite validation loss); "
                                      "lower train.learning_rate", field="train.learning_rate")
            if score < best:
                best, result.best_epoch = score, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result.history.append(row)
            if log is not None:
                log(row)
            bar(1)
    model.load_state_dict(best_state)
    model.eval()
    result.metrics = {"train": evaluate_split(model, tr, dtype)}
    if va.graphs:
        result.metrics["val"] = evaluate_split(model, va, dtype)
    return result


def load_split(path: Path = DATA) -> dict[str, list[Atoms]]:
    if not path.is_file():
        raise StageInputError("curated data missing: run `dvc repro validate` first", file=str(path))
    frames, rejected = read_extxyz(path)
    if rejected:
        raise StageInputError(f"{len(rejected)} unreadable frame(s) in curated data; first: {rejected[0].reason}",
                              file=str(path))
    out: dict[str, list[Atoms]] = {"train": [], "val": [], "test": []}
    for a in frames:
        out.setdefault(str(a.info.get("split", "train")), []).append(a)
    if not out["train"]:
        raise StageInputError("no frames in the train split (check ingest.split)", file=str(path),
                              field="split")
    return out


def learning_curve_plot(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, unit in ((axes[0], "energy_mae_per_atom", "eV/atom"), (axes[1], "force_mae", "eV/Å")):
        for split in ("train", "val"):
            ys = [h.get(f"{split}_{key}") for h in history]
            if any(y is not None for y in ys):
                ax.semilogy(ep, ys, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key.replace('_', ' ')} ({unit})")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(p: TrainParams, d: DescriptorParams, data_path: Path = DATA) -> dict:
    import mlflow

    splits = load_split(data_path)
    out_dir = MODELS_DIR / p.model_name
    exp_id = tracking.experiment_id(p.tracking_uri, p.experiment, p.artifact_location)
    data_md5 = tracking.file_md5(data_path)
    t0 = time.perf_counter()
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{p.model_name}-train") as run:
        mlflow.log_params({f"train.{k}": v for k, v in flatten(p).items()}
                          | {f"descriptors.{k}": v for k, v in flatten(d).items()})
        mlflow.set_tags({"mlipops.stage": "train", "mlipops.model_name": p.model_name,
                         "data.path": str(data_path), "data.dvc_md5": data_md5,
                         "git.commit": tracking.git_commit(),
                         "data.n_train": len(splits["train"]), "data.n_val": len(splits["val"])})

        def log(row):
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

        result = fit(splits["train"], splits["val"], p, d, log=log)
        wall = time.perf_counter() - t0
        final = {f"{s}.{k}": v for s, m in result.metrics.items() for k, v in m.items()}
        mlflow.log_metrics({f"final_{k.replace('.', '_')}": v for k, v in final.items()}
                           | {"best_epoch": result.best_epoch, "wall_time_s": wall})
        extra = {"model_name": p.model_name, "trained_on": {"path": str(data_path), "dvc_md5": data_md5},
                 "mlflow_run_id": run.info.run_id, "dtype": p.dtype}
        result.model.save(out_dir, extra=extra)
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
        run_info = {"run_id": run.info.run_id, "experiment_id": exp_id, "artifact_uri": run.info.artifact_uri,
                    "tracking_uri": tracking.tracking_uri(p.tracking_uri), "data_md5": data_md5}
        (out_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    learning_curve_plot(REPORT_DIR / "learning_curve.png", result.history)
    metrics = final | {"best_epoch": result.best_epoch, "epochs": p.epochs, "wall_time_s": round(wall, 2),
                       "n_train": len(splits["train"]), "n_val": len(splits["val"])}
    write_metrics(REPORT_DIR, metrics)
    write_markdown(REPORT_DIR / "summary.md", f"Training of `{p.model_name}`", [
        f"MLflow run `{run_info['run_id']}` in experiment `{p.experiment}`; data md5 `{data_md5}`.",
        f"{len(splits['train'])} train / {len(splits['val'])} val frames, {p.epochs} epochs, "
        f"best epoch {result.best_epoch}, {wall:.1f} s.",
        "![learning curve](learning_curve.png)",
    ], table=(("split", "energy MAE (eV/atom)", "force MAE (eV/Å)"),
              [(s, m["energy_mae_per_atom"], m["force_mae"]) for s, m in result.metrics.items()]))
    return metrics
