"""Curriculum training: short cutoff / small network first, then grow, each phase warm-started.

``train.curriculum`` lists the phases (cutoff, hidden widths, epochs, learning rate); the last one is the
final model. Between phases the network grows *without changing what it has learnt*:

- a widened layer keeps its old units; the new units get fresh incoming weights and zero weights into the
  old units and the output, so they start at zero output and the prediction is unchanged;
- an appended layer of width ≥ 2c (c: the width before it) starts as an exact identity on its first 2c
  units, W = [I; -I], b = 0, read out with [v, -v], since SiLU(x) - SiLU(-x) = x; the rest start at zero output.

A phase with a new cutoff recomputes the descriptors (new neighbour lists) and re-standardises them on
the training frames; the weights carry over (the descriptor dimension does not depend on the cutoff),
the function does not exactly, since the inputs changed. Each phase is a nested MLflow run
(``curriculum_phase`` tag) under its member's run.
"""

from __future__ import annotations

import torch
from torch import nn

from mlipops.errors import MlipopsError
from mlipops.models.potential import AtomicEnergyMLP, Potential
from mlipops.params import DescriptorParams, TrainParams, growth_error


def phases(p: TrainParams, d: DescriptorParams) -> list[tuple[TrainParams, DescriptorParams]]:
    """(train params, descriptor params) of each phase; one phase, (p, d), without a curriculum."""
    if not p.curriculum:
        return [(p, d)]
    out = []
    for ph in p.curriculum:
        cut = ph.cutoff if ph.cutoff is not None else d.cutoff
        ang = ph.angular_cutoff if ph.angular_cutoff is not None else min(d.angular_cutoff, cut)
        dd = d.model_copy(update={"cutoff": float(cut), "angular_cutoff": float(ang)})
        pp = p.model_copy(update={"epochs": ph.epochs, "hidden": list(ph.hidden if ph.hidden is not None else p.hidden),
                                  "learning_rate": ph.learning_rate or p.learning_rate, "curriculum": []})
        out.append((pp, dd))
    return out


def _linears(mlp: AtomicEnergyMLP) -> list[nn.Linear]:
    return [m for m in mlp.net if isinstance(m, nn.Linear)]


@torch.no_grad()
def _grow_mlp(old: AtomicEnergyMLP, new: AtomicEnergyMLP) -> None:
    lo, ln = _linears(old), _linears(new)
    n_old = len(lo) - 1  # hidden layers of the old network
    for k in range(n_old):  # widen: old units keep their weights and see nothing from new units
        w, b = lo[k].weight, lo[k].bias
        ln[k].weight[: w.shape[0]] = 0.0
        ln[k].weight[: w.shape[0], : w.shape[1]] = w
        ln[k].bias[: w.shape[0]] = b
    # readout over the current last layer: the old output weights, zero on new units
    c = ln[n_old - 1].out_features if n_old else ln[0].in_features
    v = torch.zeros(c, dtype=lo[-1].weight.dtype, device=lo[-1].weight.device)
    v[: lo[-1].weight.shape[1]] = lo[-1].weight[0]
    for k in range(n_old, len(ln) - 1):  # appended layers: identity through SiLU(x) - SiLU(-x) = x
        w = ln[k].weight
        if w.shape[0] < 2 * c:
            raise MlipopsError(f"appended layer {k} has {w.shape[0]} units, needs at least {2 * c}",
                               field="train.curriculum")
        eye = torch.eye(c, dtype=w.dtype, device=w.device)
        w[:c], w[c:2 * c] = eye, -eye
        ln[k].bias[: 2 * c] = 0.0
        v = torch.cat([v, -v, v.new_zeros(w.shape[0] - 2 * c)])
        c = w.shape[0]
    ln[-1].weight[0] = v
    ln[-1].bias.copy_(lo[-1].bias)


@torch.no_grad()
def grow(old: Potential, hidden: list[int], descriptor: dict | None = None, seed: int | None = None) -> Potential:
    """A potential with ``hidden`` widths (and ``descriptor`` settings, default the old ones) that
    starts from ``old``'s weights; with unchanged descriptors it predicts exactly what ``old`` does.
    ``seed`` makes the new units' initial weights reproducible (a resumed run grows the same network)."""
    err = growth_error(old.hidden, list(hidden))
    if err:
        raise MlipopsError(err, field="train.curriculum")
    descriptor = dict(descriptor if descriptor is not None else old.descriptor_params)
    ref = next(old.parameters())
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        new = Potential(old.species, descriptor, list(hidden), old.dispersion_params, old.baseline_spec)
    new = new.to(dtype=ref.dtype, device=ref.device)
    if new.descriptor.n_features != old.descriptor.n_features:
        raise MlipopsError(f"descriptor size changes between phases ({old.descriptor.n_features} -> "
                           f"{new.descriptor.n_features}): a phase may change cutoffs, not basis sizes",
                           field="train.curriculum")
    new.e0.copy_(old.e0)
    new.feature_mean.copy_(old.feature_mean)
    new.feature_std.copy_(old.feature_std)
    for mo, mn in zip(old.mlps, new.mlps):
        _grow_mlp(mo, mn)
    return new.eval()
