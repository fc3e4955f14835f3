"""The embedded dataset is the same file on every CPU: `generate` with numpy's SIMD dispatch and
OpenBLAS's kernel restricted writes the bytes whose md5 `dvc.lock` records.

A different CPU is simulated the way it differs: numpy's dispatched kernels (AVX2, AVX-512) switched
off with ``NPY_DISABLE_CPU_FEATURES`` and OpenBLAS pinned to an older kernel with ``OPENBLAS_CORETYPE``,
one BLAS thread. Without the decimal grids of ``mlipops.generate.recipes`` (module doc) the restricted
run's file differs already in the fitted lattice constant, and the liquid MD diverges.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlipops.frames import file_md5

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _lock_generate() -> dict:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    return lock["stages"]["generate"]


def _dispatched_features() -> list[str]:
    """numpy's dispatch targets this CPU has (the ones NPY_DISABLE_CPU_FEATURES can switch off)."""
    code = ("from numpy._core._multiarray_umath import __cpu_dispatch__ as d, __cpu_features__ as f;"
            "print(' '.join(x for x in d if f.get(x)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return out.stdout.split() if out.returncode == 0 else []


RESTRICTED = {
    "baseline-simd": lambda feats: {"NPY_DISABLE_CPU_FEATURES": " ".join(feats), "OPENBLAS_CORETYPE": "Prescott"},
    "no-avx512": lambda feats: {"NPY_DISABLE_CPU_FEATURES": " ".join(f for f in feats if f not in ("X86_V3",)),
                                "OPENBLAS_CORETYPE": "Haswell"},
}


@pytest.mark.parametrize("setting", sorted(RESTRICTED))
def test_generate_md5_matches_dvc_lock_with_restricted_simd(tmp_path, setting):
    stage = _lock_generate()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if stage["params"]["params.yaml"]["generate"] != params["generate"]:
        pytest.skip("params.yaml's generate section differs from dvc.lock's (run `dvc repro generate` first)")
    out = next(o for o in stage["outs"] if o["path"].endswith(".extxyz"))
    feats = _dispatched_features()
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env |= RESTRICTED[setting](feats) | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run([str(BIN / "mlipops"), "generate"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = tmp_path / out["path"]
    assert file_md5(got) == out["md5"], (
        f"{out['path']} under {setting} ({env['NPY_DISABLE_CPU_FEATURES'] or 'no numpy dispatch to disable'}, "
        f"OpenBLAS {env['OPENBLAS_CORETYPE']}): md5 {file_md5(got)}, dvc.lock has {out['md5']}")
    assert got.stat().st_size == out["size"]
