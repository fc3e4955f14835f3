"""Training loop of one potential: energy + force (+ stress) loss, Adam/AdamW with a scheduler,
early stopping on validation, best-on-validation weights, checkpoints that an interrupted run
resumes from bit-for-bit.

The ensemble, Dask and MLflow orchestration around it lives in :mod:`mlipops.train.run`.
"""

from __future__ import annotations

import logging
import dataclasses
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ase import Atoms

from mlipops.errors import MlipopsError, StageInputError
from mlipops.frames import labels
from mlipops.models.baseline import BASELINE_CACHE, baseline_spec, plus_baseline
from mlipops.models.potential import Graph, Potential
from mlipops.params import DescriptorParams, TrainParams
from mlipops.paths import atomic_path

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT_FORMAT = "mlipops.checkpoint/1"

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    graphs: list[Graph]
    energy: np.ndarray  # [n_frames] eV
    forces: list[np.ndarray]
    stress: list[np.ndarray | None]  # Voigt [6] eV/Å³ where the frame has one (periodic only)
    n_atoms: np.ndarray
    config_type: np.ndarray  # [n_frames] str
    # Δ-learning: the baseline's labels, already subtracted from energy/forces/stress above (None: no baseline)
    base_energy: np.ndarray | None = None
    base_forces: list[np.ndarray] | None = None

    def subset(self, idx) -> "Prepared":
        idx = np.asarray(idx, dtype=int)
        return Prepared([self.graphs[k] for k in idx], self.energy[idx], [self.forces[k] for k in idx],
                        [self.stress[k] for k in idx], self.n_atoms[idx], self.config_type[idx],
                        None if self.base_energy is None else self.base_energy[idx],
                        None if self.base_forces is None else [self.base_forces[k] for k in idx])

    def totals(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Reference energies and forces with the baseline added back (what the oracle said)."""
        if self.base_energy is None:
            return self.energy, self.forces
        total = plus_baseline({"energy": self.energy, "forces": self.forces},
                              {"energy": self.base_energy, "forces": self.base_forces})
        return total["energy"], total["forces"]


@dataclass
class TrainResult:
    model: Potential
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    metrics: dict = field(default_factory=dict)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StageInputError("train.device is 'cuda' but no CUDA device is available", field="train.device")
    return device


def prepare(model: Potential, frames: list[Atoms], cache_dir: str | Path | None = BASELINE_CACHE) -> Prepared:
    """Graphs and targets of ``frames`` for ``model``; with a Δ-learning baseline the targets are
    E_ref − E_base, F_ref − F_base, σ_ref − σ_base (baseline labels cached in ``cache_dir``)."""
    graphs, energy, forces, stress, cts = [], [], [], [], []
    for a in frames:
        e, f, s = labels(a)
        graphs.append(model.graph(a))
        energy.append(e)
        forces.append(np.zeros((len(a), 3)) if f is None else np.asarray(f, float))
        periodic = bool(a.pbc.all() and a.cell.rank == 3)
        stress.append(np.asarray(s, float).reshape(6) if s is not None and periodic and np.size(s) == 6 else None)
        cts.append(str(a.info.get("config_type", "unknown")))
    data = Prepared(graphs, np.array(energy, dtype=float), forces, stress,
                    np.array([len(g.species) for g in graphs], dtype=int), np.array(cts, dtype=object))
    if model.baseline is not None and frames:
        base = model.baseline.labels(frames, cache_dir)
        data.base_energy = np.array([b["energy"] for b in base])
        data.base_forces = [b["forces"] for b in base]
        data.energy = data.energy - data.base_energy
        data.forces = [f - b["forces"] for f, b in zip(data.forces, base)]
        data.stress = [None if s is None or "stress" not in b else s - b["stress"] for s, b in zip(data.stress, base)]
    return data


def target_statistics(data: Prepared, n_species: int) -> dict[str, float]:
    """What the network has to learn: the variance of E/N after the per-species E0 fit (eV/atom)², and
    the mean square force component (eV/Å)², of the targets as prepared (with or without a baseline)."""
    counts = np.stack([np.bincount(g.species, minlength=n_species) for g in data.graphs]).astype(float)
    e0, *_ = np.linalg.lstsq(counts, data.energy, rcond=None)
    resid = (data.energy - counts @ e0) / data.n_atoms
    f = np.concatenate([x.ravel() for x in data.forces])
    return {"energy_var_per_atom": float(np.var(resid)), "force_mean_square": float(np.mean(f * f))}


def fit_reference_energies(model: Potential, data: Prepared) -> np.ndarray:
    """E0 per species: least squares of total energies on species counts."""
    counts = np.stack([np.bincount(g.species, minlength=len(model.species)) for g in data.graphs]).astype(float)
    e0, *_ = np.linalg.lstsq(counts, data.energy, rcond=None)
    return e0


@torch.no_grad()
def feature_statistics(model: Potential, data: Prepared, dtype, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    feats = []
    for k in range(0, len(data.graphs), 32):
        b = Potential.collate(data.graphs[k:k + 32], dtype, device)
        feats.append(model.features(b, b["positions"], b["cell"]))
    g = torch.cat(feats)
    std = g.std(0)
    return g.mean(0), torch.where(std > 1e-8 * (g.abs().mean(0) + 1e-12), std, torch.ones_like(std))


def _batches(n: int, size: int, rng: np.random.Generator | None):
    idx = rng.permutation(n) if rng is not None else np.arange(n)
    return [idx[k:k + size] for k in range(0, n, size)]


def _targets(data: Prepared, idx, dtype, device="cpu"):
    e = torch.as_tensor(data.energy[idx], dtype=dtype, device=device)
    f = torch.as_tensor(np.concatenate([data.forces[k] for k in idx]), dtype=dtype, device=device)
    n = torch.as_tensor(data.n_atoms[idx], dtype=dtype, device=device)
    has_s = np.array([data.stress[k] is not None for k in idx])
    s = None
    if has_s.any():
        s = torch.as_tensor(np.stack([data.stress[k] if data.stress[k] is not None else np.zeros(6) for k in idx]),
                            dtype=dtype, device=device)
    return e, f, n, s, torch.as_tensor(has_s, device=device)


class _ErrorSums:
    """Running sums of |ΔE|/N, (ΔE/N)², |ΔF|, ΔF² overall and per config_type."""

    def __init__(self):
        self.s = defaultdict(lambda: np.zeros(6))  # n_frames, Σ|de|, Σde², n_fcomp, Σ|df|, Σdf²

    def add(self, cts, de: np.ndarray, df_per_frame: list[np.ndarray]):
        for ct, e, f in zip(cts, de, df_per_frame):
            row = np.array([1.0, abs(e), e * e, f.size, np.abs(f).sum(), (f * f).sum()])
            self.s["__all__"] += row
            self.s[ct] += row

    def metrics(self) -> dict[str, dict[str, float]]:
        out = {}
        for ct, (n, ae, se, nf, af, sf) in self.s.items():
            out[ct] = {"energy_mae_per_atom": float(ae / n), "energy_rmse_per_atom": float(np.sqrt(se / n)),
                       "force_mae": float(af / nf) if nf else float("nan"),
                       "force_rmse": float(np.sqrt(sf / nf)) if nf else float("nan"), "n_frames": int(n)}
        return out


# ------------------------------------------------------------------------- frozen descriptors
FROZEN_MAX_BYTES = 6e9  # above this the descriptor Jacobians are not stored: the plain autograd path


@dataclass
class Frozen:
    """What does not change while a network trains on fixed frames: the descriptors G, their exact
    Jacobians J = ∂G_i/∂vec_e (:func:`mlipops.descriptors.descriptor_with_jacobian`), the edge
    vectors, and the analytic terms' energies, forces and stresses. A training step then needs
    the network and one contraction per edge, not two passes through the descriptor."""

    G: list[torch.Tensor]  # per frame [n_atoms, n_features]
    J: list[torch.Tensor]  # per frame [n_edges, n_features, 3]
    vec: list[torch.Tensor]  # per frame [n_edges, 3]
    phys_energy: torch.Tensor  # [n_frames]
    phys_forces: list[torch.Tensor]  # per frame [n_atoms, 3]
    phys_stress: list[torch.Tensor]  # per frame [6] (zeros without an analytic term)


def frozen_bytes(model: Potential, data: Prepared, dtype) -> float:
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return float(sum(len(g.edge_i) for g in data.graphs) * model.descriptor.n_features * 3 * itemsize)


def freeze(model: Potential, data: Prepared, dtype, device="cpu", chunk_atoms: int = 4000) -> Frozen:
    """Descriptors, Jacobians and analytic terms of every frame of ``data`` (see :class:`Frozen`)."""
    from mlipops.descriptors import descriptor_with_jacobian

    G, J, V, pe, pf, ps = [], [], [], [], [], []
    k = 0
    while k < len(data.graphs):
        n, end = 0, k
        while end < len(data.graphs) and (end == k or n + len(data.graphs[end].species) <= chunk_atoms):
            n += len(data.graphs[end].species)
            end += 1
        graphs = data.graphs[k:end]
        b = Potential.collate(graphs, dtype, device)
        bi = b["batch"][b["edge_i"]]
        vec = (b["positions"][b["edge_j"]] - b["positions"][b["edge_i"]]
               + torch.einsum("ek,ekl->el", b["shifts"], b["cell"][bi]))
        with torch.no_grad():
            g, jac = descriptor_with_jacobian(model.descriptor, b["species"], b["edge_i"], b["edge_j"], vec)
        na = np.cumsum([0] + [len(x.species) for x in graphs])
        ne = np.cumsum([0] + [len(x.edge_i) for x in graphs])
        for q in range(len(graphs)):
            G.append(g[na[q]:na[q + 1]])
            J.append(jac[ne[q]:ne[q + 1]])
            V.append(vec[ne[q]:ne[q + 1]])
        # the analytic terms (dispersion) at these fixed positions: constants of the training
        n_frames = len(graphs)
        if model.dispersion is None:
            pe.append(torch.zeros(n_frames, dtype=dtype, device=device))
            pf += [torch.zeros(len(x.species), 3, dtype=dtype, device=device) for x in graphs]
            ps += [torch.zeros(6, dtype=dtype, device=device)] * n_frames
        else:
            periodic = b["periodic"]
            positions, cell, inputs = model.strained_inputs(b, True, True)
            e = model.physics_energies(b, positions, cell)
            energy = e.new_zeros(n_frames).index_add_(0, b["batch"], e)
            gpos, gstrain = torch.autograd.grad(energy.sum(), inputs)
            stress = Potential.stress_from_grad(b, gstrain) * periodic[:, None]
            pe.append(energy.detach())
            pf += list(torch.split(-gpos.detach(), [len(x.species) for x in graphs]))
            ps += list(stress.detach())
        k = end
    return Frozen(G, J, V, torch.cat(pe) if pe else torch.zeros(0, dtype=dtype, device=device), pf, ps)


def frozen_forward(model: Potential, b: dict, fz: Frozen, idx, stress: bool = False,
                   create_graph: bool = False) -> dict[str, torch.Tensor]:
    """What ``model(b, forces=True, stress=stress)`` returns for frames ``idx`` of frozen data (the
    batch ``b`` from ``Potential.collate`` of the same frames supplies the indices)."""
    G = torch.cat([fz.G[k] for k in idx]).requires_grad_(True)
    e_atom = model.energies_from_features(b, G)
    n_frames = len(idx)
    energy = e_atom.new_zeros(n_frames).index_add_(0, b["batch"], e_atom)
    grad_g, = torch.autograd.grad(e_atom.sum(), G, create_graph=create_graph)  # ∂E/∂G [n_atoms, F]
    ei, ej = b["edge_i"], b["edge_j"]
    g_edge = torch.einsum("ef,efc->ec", grad_g[ei], torch.cat([fz.J[k] for k in idx]))  # ∂E/∂vec_e
    zeros = g_edge.new_zeros(G.shape[0], 3)
    forces = zeros.index_add(0, ei, g_edge) - zeros.index_add(0, ej, g_edge)
    out = {"energy": energy + fz.phys_energy[idx],
           "forces": forces + torch.cat([fz.phys_forces[k] for k in idx])}
    if stress:
        vec = torch.cat([fz.vec[k] for k in idx])
        x = g_edge.new_zeros(n_frames, 3, 3).index_add_(0, b["batch"][ei], vec[:, :, None] * g_edge[:, None, :])
        out["stress"] = (Potential.stress_from_grad(b, 0.5 * (x + x.transpose(1, 2)))
                         + torch.stack([fz.phys_stress[k] for k in idx]))
    return out


def _forward(model, b: dict, fz: Frozen | None, idx, stress: bool = False, create_graph: bool = False):
    if fz is None:
        return model(b, forces=True, stress=stress, create_graph=create_graph)
    return frozen_forward(model, b, fz, idx, stress, create_graph)


def _split_forces(f: np.ndarray, n_atoms) -> list[np.ndarray]:
    return np.split(f, np.cumsum(n_atoms)[:-1])


def evaluate_split(model, data: Prepared, dtype, batch_size: int = 16, device="cpu",
                   by_config: bool = False, frozen: Frozen | None = None) -> dict:
    """Energy-per-atom and force-component MAE/RMSE of ``model`` (a Potential or an Ensemble's
    mean) on prepared frames; with ``by_config`` also ``{config_type: metrics}`` under ``by_config``.
    ``frozen``: the frames' frozen descriptors (a Potential only), the fast path of training."""
    sums = _ErrorSums()
    for idx in _batches(len(data.graphs), batch_size, None):
        b = Potential.collate([data.graphs[k] for k in idx], dtype, device)
        out = _forward(model, b, frozen, idx)
        e, f, n, _, _ = _targets(data, idx, dtype, device)
        de = ((out["energy"].detach() - e) / n).cpu().numpy()
        df = (out["forces"].detach() - f).cpu().numpy()
        sums.add(data.config_type[idx], de, _split_forces(df, data.n_atoms[idx]))
    m = sums.metrics()
    overall = {k: v for k, v in m.pop("__all__", {}).items() if k != "n_frames"} if m else {}
    if by_config:
        overall["by_config"] = m
    return overall


# ------------------------------------------------------------------------------------ checkpoints
def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpointer:
    """Atomic checkpoints of the whole training state every ``every`` epochs (``torch.save``;
    read back with ``weights_only=True``). A checkpoint whose fingerprint (params, data hash,
    member) differs from the run's is ignored, so changed settings never resume stale weights."""

    def __init__(self, path: str | Path, key: str, every: int):
        self.path, self.key, self.every = Path(path), key, every

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file: start afresh, say so
            logger.warning(f"ignoring unreadable checkpoint {self.path}: {str(exc).splitlines()[0][:200]}")
            return None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("key") != self.key:
            logger.info(f"ignoring checkpoint {self.path}: made with other settings or data")
            return None
        return state

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(state | {"format": CHECKPOINT_FORMAT, "key": self.key}, tmp)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _cpu_state(module_or_opt) -> dict:
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().clone()
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, list):
            return [move(v) for v in x]
        return x
    return move(module_or_opt.state_dict())


# ------------------------------------------------------------------------------------------- fit
def make_potential(species: list[str], p: TrainParams, d: DescriptorParams) -> Potential:
    """An untrained potential of the params' architecture (with its D2 term and Δ-learning baseline
    when enabled)."""
    from mlipops.models.dispersion import d2_settings

    disp = None
    if p.dispersion.enabled:
        q = p.dispersion
        disp = d2_settings(species, q.s6, q.damping, q.cutoff, q.switch_width, q.c6, q.r0)
    base = baseline_spec(p.baseline.calculator, p.baseline.kwargs) if p.baseline.calculator else None
    return Potential(species, d.model_dump(), p.hidden, disp, base)


@torch.no_grad()
def physics_energies(model: Potential, data: Prepared, dtype, device="cpu") -> np.ndarray:
    """Per-frame energy of the model's analytic terms (0 without any) [n_frames]."""
    out = np.zeros(len(data.graphs))
    if model.dispersion is None:
        return out
    for k in range(0, len(data.graphs), 32):
        b = Potential.collate(data.graphs[k:k + 32], dtype, device)
        e = model.physics_energies(b, b["positions"], b["cell"])
        out[k:k + 32] = torch.zeros(len(b["n_atoms"]), dtype=e.dtype, device=e.device).index_add_(
            0, b["batch"], e).cpu().numpy()
    return out


def init_model(train: Prepared, species: list[str], p: TrainParams, d: DescriptorParams, dtype, device) -> Potential:
    model = make_potential(species, p, d).to(dtype=dtype, device=device)
    # the network learns E_ref - E_analytic: reference energies are fitted on what is left
    target = dataclasses.replace(train, energy=train.energy - physics_energies(model, train, dtype, device))
    model.e0.copy_(torch.as_tensor(fit_reference_energies(model, target), dtype=dtype))
    mean, std = feature_statistics(model, train, dtype, device)
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    return model


def species_of(frames: list[Atoms]) -> list[str]:
    return sorted({s for a in frames for s in a.get_chemical_symbols()}, key=lambda s: Atoms(s).numbers[0])


def _optimizer(model: Potential, p: TrainParams):
    """The optimizer (Adam or AdamW) and learning-rate scheduler (cosine, plateau or None) of ``p``."""
    opt_cls = torch.optim.AdamW if p.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=p.learning_rate, weight_decay=p.weight_decay)
    if p.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=p.learning_rate / 20)
    elif p.scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, (p.patience or 10) // 3))
    else:
        sched = None
    return opt, sched


@dataclass
class _Progress:
    """Where a training stands: the best validation score and weights so far, epochs without improvement, and
    the epoch to start from (after a resume: the checkpoint's + 1)."""

    best: float = float("inf")
    best_state: dict | None = None
    bad_epochs: int = 0
    start: int = 1


def _resume(checkpoint: Checkpointer | None, model: Potential, opt, sched, rng: np.random.Generator,
            result: TrainResult) -> _Progress:
    """The checkpoint's model, optimizer, scheduler and random states restored (a fresh start without one)."""
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return _Progress()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None and state.get("scheduler") is not None:
        sched.load_state_dict(state["scheduler"])
    rng.bit_generator.state = json.loads(state["np_rng"])
    torch.set_rng_state(state["torch_rng"])
    result.best_epoch, result.history = state["best_epoch"], list(state["history"])
    result.resumed_from_epoch = state["epoch"] + 1
    return _Progress(state["best"], state["best_state"], state["bad_epochs"], state["epoch"] + 1)


def _train_epoch(model: Potential, train: Prepared, p: TrainParams, opt, rng: np.random.Generator, frozen,
                 use_stress: bool, dtype, device) -> dict:
    """One pass over ``train`` in shuffled batches: the weighted energy, force (and stress) loss, one optimizer
    step per batch; the epoch's training errors, overall and per config_type, as a metrics row."""
    model.train()
    sums = _ErrorSums()
    for idx in _batches(len(train.graphs), p.batch_size, rng):
        b = Potential.collate([train.graphs[k] for k in idx], dtype, device)
        e, f, n, s, has_s = _targets(train, idx, dtype, device)
        want_s = use_stress and s is not None
        out = _forward(model, b, frozen, idx, stress=want_s, create_graph=True)
        de = (out["energy"] - e) / n
        dfor = out["forces"] - f
        loss = p.energy_weight * (de**2).mean() + p.force_weight * (dfor**2).mean()
        if want_s:
            ds = (out["stress"] - s)[has_s]
            loss = loss + p.stress_weight * (ds**2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums.add(train.config_type[idx], de.detach().cpu().numpy(),
                 _split_forces(dfor.detach().cpu().numpy(), train.n_atoms[idx]))
    tm = sums.metrics()
    row = {f"train_{k}": v for k, v in tm.pop("__all__").items() if k != "n_frames"}
    return row | {f"train_by_config/{ct}/{k}": v for ct, m in tm.items() for k, v in m.items() if k != "n_frames"}


def _validate(model: Potential, val: Prepared, p: TrainParams, epoch: int, frozen, dtype, device) -> tuple[dict, float]:
    """The validation errors as a metrics row, and the score the best epoch is chosen by (the loss's weighting
    of the squared RMSEs; without a validation split, -epoch: the last epoch is kept)."""
    if not val.graphs:
        return {}, -epoch
    m = evaluate_split(model, val, dtype, device=device, by_config=True, frozen=frozen)
    row = {f"val_{k}": v for k, v in m.items() if k != "by_config"}
    row |= {f"val_by_config/{ct}/{k}": v for ct, mm in m["by_config"].items() for k, v in mm.items()
            if k != "n_frames"}
    return row, float(p.energy_weight * m["energy_rmse_per_atom"] ** 2 + p.force_weight * m["force_rmse"] ** 2)


def fit(train: list[Atoms] | Prepared, val: list[Atoms] | Prepared, p: TrainParams, d: DescriptorParams,
        log: Callable[[dict], None] | None = None, checkpoint: Checkpointer | None = None,
        species: list[str] | None = None, device: str | None = None, progress_cb=None,
        init: Potential | None = None) -> TrainResult:
    """Train one potential on ``train``, keep the weights with the best validation loss.

    ``train``/``val`` are frames or :class:`Prepared` data (then ``species`` is required).
    ``log(row)`` receives each epoch's metrics; ``checkpoint`` makes the run resumable; ``init``
    is a model to start from (a warm start, e.g. the previous curriculum phase) instead of a fresh one.
    """
    dtype = DTYPES[p.dtype]
    device = resolve_device(device or p.device)
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed)
    if species is None:
        if isinstance(train, Prepared):
            raise MlipopsError("fit on prepared data needs the species list")
        species = species_of(train + val)
    if not isinstance(train, Prepared):
        proto = make_potential(species, p, d)
        train, val = prepare(proto, train), prepare(proto, val)
    if not train.graphs:
        raise StageInputError("no training frames", field="split")
    model = init.to(dtype=dtype, device=device) if init is not None else init_model(train, species, p, d, dtype, device)
    opt, sched = _optimizer(model, p)
    result = TrainResult(model)
    run = _resume(checkpoint, model, opt, sched, rng, result)
    use_stress = p.stress_weight > 0 and any(s is not None for s in train.stress)
    fz_tr = fz_va = None
    if p.precompute_descriptors:
        need = frozen_bytes(model, train, dtype) + frozen_bytes(model, val, dtype)
        if need <= FROZEN_MAX_BYTES:
            fz_tr, fz_va = freeze(model, train, dtype, device), freeze(model, val, dtype, device)
        else:
            logger.info(f"descriptor Jacobians would take {need / 1e9:.1f} GB: training through autograd instead")
    for epoch in range(run.start, p.epochs + 1):
        t0 = time.perf_counter()
        train_row = _train_epoch(model, train, p, opt, rng, fz_tr, use_stress, dtype, device)
        row = {"epoch": epoch, "lr": float(opt.param_groups[0]["lr"])} | train_row
        val_row, score = _validate(model, val, p, epoch, fz_va, dtype, device)
        row |= val_row
        if sched is not None:
            sched.step(score) if p.scheduler == "plateau" else sched.step()
        row["epoch_time_s"] = float(time.perf_counter() - t0)
        if not np.isfinite(score):
            raise StageInputError(f"training diverged at epoch {epoch} (non-finite validation loss); "
                                  "lower train.learning_rate", field="train.learning_rate")
        if score < run.best:
            run.best, result.best_epoch, run.bad_epochs = score, epoch, 0
            run.best_state = _cpu_state(model)
        else:
            run.bad_epochs += 1
        result.history.append(row)
        if log is not None:
            log(row)
        if progress_cb is not None:
            progress_cb(epoch, row)
        stop = p.patience is not None and run.bad_epochs >= p.patience
        if checkpoint is not None and (epoch % checkpoint.every == 0) and epoch < p.epochs and not stop:
            checkpoint.save({"epoch": epoch, "model": _cpu_state(model), "optimizer": _cpu_state(opt),
                             "scheduler": sched.state_dict() if sched is not None else None,
                             "np_rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
                             "best": run.best, "best_state": run.best_state, "bad_epochs": run.bad_epochs,
                             "best_epoch": result.best_epoch, "history": result.history})
        if stop:
            result.stopped_early = True
            break
    model.load_state_dict(run.best_state)
    model.eval()
    result.metrics = {"train": evaluate_split(model, train, dtype, device=device, by_config=True, frozen=fz_tr)}
    if val.graphs:
        result.metrics["val"] = evaluate_split(model, val, dtype, device=device, by_config=True, frozen=fz_va)
    return result
