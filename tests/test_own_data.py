"""Issue 24, items 1 and 2: a user's own DFT data, read as ASE reads it and split by file.

Real files: a ``.traj`` written by ASE's own writer; VASP ``vasprun.xml`` and ``OUTCAR`` and a Quantum
ESPRESSO ``pw.x`` output written here line by line in the programs' own layout (ASE has no writer for
them; the layout is that of VASP 5.4 / QE 6-7 outputs and of the templates in ASE's own tests,
``ase/test/fio/vasp/test_read_vasp_xml.py``, ``ase/test/testdata/vasp/OUTCAR_example_1``,
``ase/test/fio/test_espresso.py``), with chosen energies, forces and stresses in the programs' units and
sign (VASP: kbar, QE: Ry, Ry/bohr, Ry/bohr³; both print the stress as a pressure, compressive positive),
so each ingested value is checked against an independent conversion to eV, eV/Å and ASE's stress
(eV/Å³, tensile positive). Every file goes through ``mlipops ingest`` (the real CLI) in a temporary
project, as tests/test_bad_input.py runs it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mlipops.errors import FrameFormatError
from mlipops.frames import labels, read_extxyz, read_frames
from test_bad_input import error_line, make_project, mlipops

# independent constants (CODATA 2014/2018: ASE's and QE's tables agree to 1e-7)
EV_PER_A3_IN_KBAR = 1602.1766208  # 1 eV/Å³ = 1.602e11 Pa = 1602 kbar
RY = 13.605693122994  # eV
BOHR = 0.529177210903  # Å

A_SI = 5.43  # Å, diamond Si


def _si_frames(n: int, seed: int = 0) -> list[dict]:
    """n two-atom diamond-Si cells (strained, rattled) with labels in eV, eV/Å and a pressure-positive stress
    in kbar (VASP's "in kB" order xx yy zz xy yz zx); forces sum to zero."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        s = 1.0 + 0.01 * (k - 1)
        cell = 0.5 * A_SI * s * np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
        frac = np.array([[0.0, 0.0, 0.0], [0.25, 0.25, 0.25]]) + rng.normal(0, 0.004, (2, 3))
        f = rng.normal(0, 0.3, 3)
        p = -150.0 * (s - 1.0) * 100  # compressed (s < 1): positive pressure
        out.append({"cell": cell, "frac": frac, "pos": frac @ cell, "forces": np.array([f, -f]),
                    "e0": -10.84 + 0.3 * (s - 1.0) ** 2 * 100 + 0.001 * k, "efr": -10.85 + 0.001 * k,
                    "kbar": np.array([p + 3.0, p - 2.0, p + 1.0, 4.0, -5.0, 6.0])})
    return out


def _ase_stress_from_kbar(v: np.ndarray) -> np.ndarray:
    """VASP's pressure-positive kbar (xx yy zz xy yz zx) as ASE's stress: eV/Å³, tensile positive,
    xx yy zz yz xz xy."""
    return -np.asarray(v)[[0, 1, 2, 4, 5, 3]] / EV_PER_A3_IN_KBAR


# ------------------------------------------------------------------------------------ VASP vasprun.xml
def _v(rows) -> str:
    return "".join(f"   <v> {' '.join(f'{x:16.8f}' for x in r)} </v>\n" for r in rows)


def vasprun_xml(frames: list[dict]) -> str:
    """A vasprun.xml as VASP 5.4 writes it (the elements ASE's vasp-xml reader uses, in VASP's order)."""
    head = f"""<?xml version="1.0" encoding="ISO-8859-1"?>
<modeling>
 <generator>
  <i name="program" type="string">vasp </i>
  <i name="version" type="string">5.4.4.18Apr17-6-g9f103f2a35  </i>
  <i name="subversion" type="string">(build Oct 30 2019 10:55:04) complex            parallel </i>
  <i name="platform" type="string">LinuxIFC </i>
 </generator>
 <incar>
  <i type="string" name="PREC">accurate</i>
  <i name="ENCUT">    520.00000000</i>
  <i name="IBRION">      0</i>
 </incar>
 <kpoints>
  <varray name="kpointlist" >
   <v>       0.00000000       0.00000000       0.00000000 </v>
  </varray>
  <varray name="weights" >
   <v>       1.00000000 </v>
  </varray>
 </kpoints>
 <atominfo>
  <atoms>       2 </atoms>
  <types>       1 </types>
  <array name="atoms" >
   <dimension dim="1">ion</dimension>
   <field type="string">element</field>
   <field type="int">atomtype</field>
   <set>
    <rc><c>Si</c><c>   1</c></rc>
    <rc><c>Si</c><c>   1</c></rc>
   </set>
  </array>
 </atominfo>
 <structure name="initialpos" >
  <crystal>
   <varray name="basis" >
{_v(frames[0]['cell'])}   </varray>
   <i name="volume">     {abs(np.linalg.det(frames[0]['cell'])):.8f} </i>
  </crystal>
  <varray name="positions" >
{_v(frames[0]['frac'])}  </varray>
 </structure>
"""
    body = ""
    for fr in frames:
        energy = (f'   <i name="e_fr_energy">   {fr["efr"]:.8f} </i>\n'
                  f'   <i name="e_wo_entrp">    {(fr["efr"] + fr["e0"]) / 2:.8f} </i>\n'
                  f'   <i name="e_0_energy">    {fr["e0"]:.8f} </i>\n')
        stress3 = np.array([[fr["kbar"][0], fr["kbar"][3], fr["kbar"][5]],
                            [fr["kbar"][3], fr["kbar"][1], fr["kbar"][4]],
                            [fr["kbar"][5], fr["kbar"][4], fr["kbar"][2]]])
        first = energy.replace(f'{fr["e0"]:.8f}', f'{fr["e0"] + 0.5:.8f}').replace(
            f'{fr["efr"]:.8f}', f'{fr["efr"] + 0.5:.8f}')  # the first electronic step, not converged
        body += f""" <calculation>
  <scstep>
   <energy>
{first}   </energy>
  </scstep>
  <scstep>
   <energy>
{energy}   </energy>
  </scstep>
  <structure>
   <crystal>
    <varray name="basis" >
{_v(fr['cell'])}    </varray>
    <i name="volume">     {abs(np.linalg.det(fr['cell'])):.8f} </i>
   </crystal>
   <varray name="positions" >
{_v(fr['frac'])}   </varray>
  </structure>
  <varray name="forces" >
{_v(fr['forces'])}  </varray>
  <varray name="stress" >
{_v(stress3)}  </varray>
  <energy>
{energy}  </energy>
  <time name="totalsc">    1.12    1.13</time>
 </calculation>
"""
    return head + body + f""" <structure name="finalpos" >
  <crystal>
   <varray name="basis" >
{_v(frames[-1]['cell'])}   </varray>
  </crystal>
  <varray name="positions" >
{_v(frames[-1]['frac'])}  </varray>
 </structure>
</modeling>
"""


# ---------------------------------------------------------------------------------------- VASP OUTCAR
def outcar(frames: list[dict]) -> str:
    """An OUTCAR as VASP 5.4 prints it (header with POTCAR and ions per type; per ionic step the stress
    block, the lattice, positions and total forces, and the FREE ENERGIE block; then the timing)."""
    rule = "-" * 104
    text = (" vasp.5.4.4.18Apr17-6-g9f103f2a35 (build Oct 30 2019 10:55:04) complex\n"
            " executed on             LinuxIFC date 2024.05.02  10:11:12\n running on    4 total cores\n\n"
            f"{rule}\n\n\n INCAR:\n POTCAR:    PAW_PBE Si 05Jan2001\n   ENCUT  = 520\n   IBRION = 0\n\n"
            " POTCAR:    PAW_PBE Si 05Jan2001\n   VRHFIN =Si: s2p2\n   LEXCH  = PE\n\n"
            "   ions per type =               2\n\n"
            "   ISPIN  =      1    spin polarized calculation?\n\n")
    for k, fr in enumerate(frames, start=1):
        v = fr["kbar"]
        pos = "".join(f"  {p[0]:11.5f}  {p[1]:11.5f}  {p[2]:11.5f}    {f[0]:14.6f} {f[1]:13.6f} {f[2]:13.6f}\n"
                      for p, f in zip(fr["pos"], fr["forces"]))
        rec = np.linalg.inv(fr["cell"]).T
        lat = "".join(f"  {a[0]:14.9f}{a[1]:13.9f}{a[2]:13.9f}  {b[0]:14.9f}{b[1]:13.9f}{b[2]:13.9f}\n"
                      for a, b in zip(fr["cell"], rec))
        for m in (1, 2):
            text += (f"{'-' * 39} Iteration {k:6d}({m:4d})  {'-' * 39}\n\n\n"
                     "    POTLOK:  cpu time    0.0120: real time    0.0122\n\n"
                     f"  free energy    TOTEN  =       {fr['efr'] + (0.5 if m == 1 else 0):.8f} eV\n\n"
                     f"  energy without entropy =      {fr['efr']:.8f}  energy(sigma->0) =      {fr['e0']:.8f}\n\n\n")
        text += (f" {'-' * 24} aborting loop because EDIFF is reached {'-' * 38}\n\n\n"
                 "  FORCE on cell =-STRESS in cart. coord.  units (eV):\n"
                 "  Direction    XX          YY          ZZ          XY          YZ          ZX\n"
                 f"  {'-' * 86}\n"
                 "  Total   " + "".join(f"{x / 10:12.5f}" for x in v) + "\n"
                 "  in kB   " + "".join(f"{x:12.5f}" for x in v) + "\n"
                 f"  external pressure =      {np.mean(v[:3]):7.2f} kB  Pullay stress =        0.00 kB\n\n\n"
                 " VOLUME and BASIS-vectors are now :\n"
                 " -----------------------------------------------------------------------------\n"
                 "  energy-cutoff  :      520.00\n"
                 f"  volume of cell :      {abs(np.linalg.det(fr['cell'])):7.2f}\n"
                 "      direct lattice vectors                 reciprocal lattice vectors\n"
                 f"{lat}\n"
                 " POSITION                                       TOTAL-FORCE (eV/Angst)\n"
                 " -----------------------------------------------------------------------------------\n"
                 f"{pos}"
                 " -----------------------------------------------------------------------------------\n"
                 "    total drift:                                0.000000      0.000000      0.000000\n\n\n"
                 f"{rule}\n\n\n\n"
                 "  FREE ENERGIE OF THE ION-ELECTRON SYSTEM (eV)\n"
                 "  ---------------------------------------------------\n"
                 f"  free  energy   TOTEN  =       {fr['efr']:.8f} eV\n\n"
                 f"  energy  without entropy=      {fr['efr']:.8f}  energy(sigma->0) =      {fr['e0']:.8f}\n\n\n\n"
                 f"{rule}\n\n\n")
    return text + ("\n General timing and accounting informations for this job:\n"
                   " ========================================================\n\n"
                   "                  Total CPU time used (sec):        1.234\n"
                   "                 Voluntary context switches:            0\n")


# ------------------------------------------------------------------------------------- QE pw.x output
def pw_out(frames: list[dict]) -> tuple[str, list[dict]]:
    """A pw.x (Quantum ESPRESSO 6.x) output of a variable-cell run (the lines ASE's espresso-out reader uses,
    as pw.x prints them). Returns the text and the labels in pw.x's units: energy Ry, forces Ry/bohr,
    stress Ry/bohr³ (pressure positive)."""
    alat = A_SI / BOHR / 2 ** 0.5  # bohr: |a1| of the fcc primitive cell
    first = frames[0]
    axes = first["cell"] / (alat * BOHR)
    text = ("\n     Program PWSCF v.6.8 starts on  2May2024 at 10:11:12 \n\n"
            "     This program is part of the open-source Quantum ESPRESSO suite\n\n"
            "     bravais-lattice index     =            0\n"
            f"     lattice parameter (alat)  =      {alat:8.4f}  a.u.\n"
            f"     unit-cell volume          =     {abs(np.linalg.det(first['cell'])) / BOHR ** 3:8.4f} (a.u.)^3\n"
            "     number of atoms/cell      =            2\n"
            "     number of atomic types    =            1\n"
            "     number of electrons       =         8.00\n"
            "     kinetic-energy cutoff     =      40.0000  Ry\n\n"
            "     number of k points=   120  Marzari-Vanderbilt smearing, width (Ry)=  0.0100\n\n"
            "     Number of k-points >= 100: set verbosity='high' to print them.\n\n"
            f"     celldm(1)=  {alat:10.6f}  celldm(2)=   0.000000  celldm(3)=   0.000000\n"
            "     celldm(4)=   0.000000  celldm(5)=   0.000000  celldm(6)=   0.000000\n\n"
            "     crystal axes: (cart. coord. in units of alat)\n"
            + "".join(f"               a({i + 1}) = ( {a[0]:10.6f} {a[1]:10.6f} {a[2]:10.6f} )  \n"
                      for i, a in enumerate(axes))
            + "\n     atomic species   valence    mass     pseudopotential\n"
            "        Si             4.00    28.08550     Si( 1.00)\n\n"
            "   Cartesian axes\n\n"
            "     site n.     atom                  positions (alat units)\n"
            + "".join(f"         {i + 1}           Si  tau(   {i + 1}) = ( {p[0]:11.7f} {p[1]:11.7f} {p[2]:11.7f}  )\n"
                      for i, p in enumerate(first["pos"] / (alat * BOHR))))
    units = []
    for k, fr in enumerate(frames):
        if k:
            text += ("\nCELL_PARAMETERS (angstrom)\n"
                     + "".join(f"   {a[0]:.9f}   {a[1]:.9f}   {a[2]:.9f}\n" for a in fr["cell"])
                     + "\nATOMIC_POSITIONS (angstrom)\n"
                     + "".join(f"Si       {p[0]:.9f}   {p[1]:.9f}   {p[2]:.9f}\n" for p in fr["pos"]) + "\n\n")
        e_ry = fr["e0"] / RY
        f_ry = fr["forces"] / (RY / BOHR)
        v = fr["kbar"]
        s_kbar = np.array([[v[0], v[3], v[5]], [v[3], v[1], v[4]], [v[5], v[4], v[2]]])
        s_ry = s_kbar / EV_PER_A3_IN_KBAR / (RY / BOHR ** 3)
        units.append({"energy": e_ry, "forces": f_ry, "stress": s_ry})
        text += ("\n     End of self-consistent calculation\n\n"
                 "     Number of k-points >= 100: set verbosity='high' to print the bands.\n\n"
                 "     the Fermi energy is     6.2130 ev\n\n"
                 f"!    total energy              =     {e_ry:.8f} Ry\n"
                 "     estimated scf accuracy    <          6.2E-09 Ry\n\n"
                 "     convergence has been achieved in   6 iterations\n\n"
                 "     Forces acting on atoms (cartesian axes, Ry/au):\n\n"
                 + "".join(f"     atom    {i + 1} type  1   force =   {f[0]:14.8f}{f[1]:14.8f}{f[2]:14.8f}\n"
                           for i, f in enumerate(f_ry))
                 + "     Total force =     0.010000     Total SCF correction =     0.000001\n\n\n"
                 "     Computing stress (Cartesian axis) and pressure\n\n"
                 "          total   stress  (Ry/bohr**3)                   (kbar)     P=  "
                 f"{np.trace(s_kbar) / 3:10.2f}\n"
                 + "".join(f"  {r[0]:12.8f}  {r[1]:12.8f}  {r[2]:12.8f}  {q[0]:12.2f}  {q[1]:12.2f}  {q[2]:12.2f}\n"
                           for r, q in zip(s_ry, s_kbar)) + "\n")
    return text + "\n     JOB DONE.\n", units


# ----------------------------------------------------------------------------------------- helpers
def _ingest(root: Path, sources: list[dict], **params) -> tuple[list, pd.DataFrame]:
    """Run `mlipops ingest` with these sources (and params overrides): (ingested frames, rejected table)."""
    _set(root, sources, **params)
    r = mlipops(root, "ingest")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    frames, bad = read_extxyz(root / "data/ingested/frames.extxyz")
    assert bad == []
    return frames, pd.read_parquet(root / "data/ingested/rejected.parquet")


def _set(root: Path, sources: list[dict], **sections) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["sources"] = sources
    for dotted, value in sections.items():
        node = params
        *head, last = dotted.split("__")
        for key in head:
            node = node[key]
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _by_source(frames, name: str) -> list:
    return sorted((a for a in frames if a.info["source"] == name), key=lambda a: a.info["source_index"])


# ------------------------------------------------------------------------- 1: read what ASE reads
def _check_vasp(frames, si, pos_atol):
    assert [a.info["source_index"] for a in frames] == list(range(len(si)))
    for a, fr in zip(frames, si):
        e, f, s = labels(a)
        assert e == pytest.approx(fr["e0"], abs=1e-7)  # ASE's energy: sigma -> 0
        np.testing.assert_allclose(f, fr["forces"], atol=2e-6)
        np.testing.assert_allclose(s, _ase_stress_from_kbar(fr["kbar"]), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(a.cell.array, fr["cell"], atol=1e-7)
        np.testing.assert_allclose(a.positions, fr["pos"], atol=pos_atol)
        assert list(a.symbols) == ["Si", "Si"]


def test_traj_vasp_and_qe_outputs_ingest_with_their_labels(tmp_path):
    """.traj (ASE's writer, 3 frames), vasprun.xml, OUTCAR (gzipped), QE .pwo and .out, all with format auto,
    in one ingest: frame counts, energies, forces, stress (values and ASE's sign), provenance."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT

    root = make_project(tmp_path, [])
    raw = root / "raw"
    traj = []
    for s in (0.98, 1.0, 1.03):
        a = bulk("Cu", "fcc", 3.6 * s, cubic=True)
        a.rattle(0.02, seed=int(s * 100))
        a.calc = EMT()
        a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.info["split"] = "train"  # a user's file cannot choose its split
        traj.append(a)
    ase.io.write(raw / "cu_md.traj", traj)
    si = {name: _si_frames(n, seed) for name, n, seed in
          (("vasprun", 3, 0), ("OUTCAR", 2, 1), ("si_relax", 3, 2), ("si_md", 2, 3))}
    (raw / "vasprun.xml").write_text(vasprun_xml(si["vasprun"]))
    (raw / "OUTCAR.gz").write_bytes(gzip.compress(outcar(si["OUTCAR"]).encode()))
    relax_text, relax_units = pw_out(si["si_relax"])
    md_text, md_units = pw_out(si["si_md"])
    (raw / "si_relax.pwo").write_text(relax_text)
    (raw / "si_md.out").write_text(md_text)
    sources = [{"path": f"raw/{n}", "config_type": ct} for n, ct in
               (("cu_md.traj", "md"), ("vasprun.xml", "relax"), ("OUTCAR.gz", "relax"), ("si_relax.pwo", "qe"),
                ("si_md.out", "qe_md"))]
    frames, rejected = _ingest(root, sources)
    assert rejected.empty
    assert {k: len(_by_source(frames, k)) for k in ("cu_md", "vasprun", "OUTCAR", "si_relax", "si_md")} == \
        {"cu_md": 3, "vasprun": 3, "OUTCAR": 2, "si_relax": 3, "si_md": 2}
    assert len(frames) == 13

    cu = _by_source(frames, "cu_md")
    assert [a.info["source_index"] for a in cu] == [0, 1, 2]
    for a, ref in zip(cu, traj):
        e, f, s = labels(a)
        assert e == pytest.approx(ref.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(f, ref.get_forces(), atol=1e-7)  # extxyz keeps 8 decimals
        np.testing.assert_allclose(s, ref.get_stress(), atol=1e-8)
        assert a.info["config_type"] == "md" and a.info["split"] in ("train", "val", "test")
        assert a.info["file_split"] == "train"  # kept for the record only

    _check_vasp(_by_source(frames, "vasprun"), si["vasprun"], 1e-6)
    _check_vasp(_by_source(frames, "OUTCAR"), si["OUTCAR"], 2e-5)  # OUTCAR prints positions to 1e-5 Å
    assert {a.info["config_type"] for a in _by_source(frames, "OUTCAR")} == {"relax"}
    # compressed cells (VASP's pressure > 0) have a negative ASE stress, stretched ones a positive one
    vs = [labels(a)[2] for a in _by_source(frames, "vasprun")]
    assert vs[0][:3].mean() < 0 < vs[2][:3].mean()

    for name, units in (("si_relax", relax_units), ("si_md", md_units)):
        got = _by_source(frames, name)
        assert [a.info["source_index"] for a in got] == list(range(len(si[name])))
        for a, fr, u in zip(got, si[name], units):
            e, f, s = labels(a)
            assert e == pytest.approx(u["energy"] * RY, rel=1e-6)  # pw.x's Ry
            np.testing.assert_allclose(f, u["forces"] * RY / BOHR, rtol=1e-5, atol=1e-6)  # Ry/bohr
            voigt = -u["stress"].reshape(9)[[0, 4, 8, 5, 2, 1]] * RY / BOHR ** 3  # compressive positive -> ASE
            np.testing.assert_allclose(s, voigt, rtol=1e-5, atol=2e-6)
            np.testing.assert_allclose(s, _ase_stress_from_kbar(fr["kbar"]), rtol=1e-5, atol=2e-6)
            np.testing.assert_allclose(a.cell.array, fr["cell"], atol=1e-5)
            np.testing.assert_allclose(a.positions, fr["pos"], atol=1e-5)


def test_truncated_vasprun_is_recorded_never_silently_short(tmp_path):
    """A vasprun.xml cut inside ionic step 2 of 3: step 1 ingested, a Rejected record naming the file and
    frame for the rest (ASE's reader passes over it quietly); cut before the first structure: one line, exit 2."""
    root = make_project(tmp_path, [])
    text = vasprun_xml(_si_frames(3))
    second = text.index("<calculation>", text.index("<calculation>") + 1)
    (root / "raw/vasprun_cut.xml").write_text(text[:second + 300])
    frames, rejected = _ingest(root, [{"path": "raw/vasprun_cut.xml"}])
    assert len(frames) == 1 and labels(frames[0])[0] is not None
    assert len(rejected) == 1
    row = rejected.iloc[0]
    assert (row.source, row.source_index, row.check) == ("vasprun_cut", 1, "parse")
    assert row.reason.startswith("raw/vasprun_cut.xml frame 1: the file ends inside ionic step 2 (truncated?)")
    # validate counts it: ingested = accepted + quarantined
    _set(root, [{"path": "raw/vasprun_cut.xml"}], validate__allowed_species=["Si"],
         validate__energy_per_atom_range={"default": [-20.0, 5.0]})
    r = mlipops(root, "validate")
    assert r.returncode == 0, r.stderr
    m = json.loads((root / "reports/validate/metrics.json").read_text())
    assert m["n_ingested"] == 2 and m["n_quarantined"] == 1

    (root / "raw/vasprun_head.xml").write_text(text[:text.index('<structure name="initialpos"') + 120])
    _set(root, [{"path": "raw/vasprun_head.xml"}])
    line = error_line(mlipops(root, "ingest"))
    assert line.startswith("mlipops: error: raw/vasprun_head.xml: ASE's vasp-xml reader cannot read it (no frame "
                           "read): ParseError: "), line


def test_ase_reader_stopping_mid_file_records_the_rest(tmp_path):
    """ASE's reader raises at frame k (an OUTCAR whose second step has VASP's Fortran overflow `*******` in a
    force): frames before k are kept, one Rejected record names the file, frame k and ASE's message."""
    si = _si_frames(3, seed=7)
    text = outcar(si)
    second = text.index("TOTAL-FORCE", text.index("TOTAL-FORCE") + 1)
    line_end = text.index("\n", text.index("\n", text.index("\n", second) + 1) + 1)
    bad = text[:line_end - 14] + "  ************" + text[line_end:]
    (tmp_path / "OUTCAR").write_text(bad)
    frames, rejected = read_frames(tmp_path / "OUTCAR")
    assert len(frames) == 1 and labels(frames[0])[0] == pytest.approx(si[0]["e0"])
    assert [(r.source, r.source_index, r.check) for r in rejected] == [("OUTCAR", 1, "parse")]
    assert rejected[0].reason == (f"{tmp_path / 'OUTCAR'} frame 1: ASE's vasp-out reader stopped here: ValueError: "
                                  "could not convert string to float: '************'; frames 1 on are not read")


def test_ase_format_names_in_params(tmp_path):
    """format: any name ase.io reads (here traj for a file whose name says nothing); an unknown name or one
    ASE cannot read is a one-line error naming the key, exit 2."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT

    root = make_project(tmp_path, [])
    a = bulk("Cu", "fcc", 3.6)
    a.calc = EMT()
    a.get_potential_energy()
    ase.io.write(root / "raw/run.bin", [a], format="traj")
    frames, _ = _ingest(root, [{"path": "raw/run.bin", "format": "traj"}])
    assert len(frames) == 1 and labels(frames[0])[0] == pytest.approx(a.get_potential_energy())
    for fmt, says in (("vasp_xml", "unknown format 'vasp_xml'"), ("png", "can write but not read"),
                      ("postgresql", "not a file")):
        _set(root, [{"path": "raw/run.bin", "format": fmt}])
        line = error_line(mlipops(root, "ingest"))
        assert line.startswith("mlipops: error: params.yaml: ingest.sources.0.format: "), line
        assert says in line, line
    _set(root, [{"path": "raw/run.bin", "stress_units": "kbar"}])
    line = error_line(mlipops(root, "ingest"))
    assert "stress_units given without stress_key" in line and "ingest.sources.0" in line, line


def test_a_text_file_named_for_an_ase_format_is_not_quoted(tmp_path):
    """A file ASE's detection picks by its suffix only (.cif, .out) whose content is no such file: one line,
    ASE's message (which can quote the file) not shown; a file named OUTCAR is one: ASE's message."""
    secret = "s3cr3t-Line root:x:0:0\nhunter2 12 3.4\n"
    for name, fmt in (("notes.cif", "cif"), ("notes.out", "espresso-out")):
        (tmp_path / name).write_text(secret)
        with pytest.raises(FrameFormatError) as info:
            read_frames(tmp_path / name)
        msg = str(info.value)
        assert "s3cr3t" not in msg and "hunter2" not in msg and "root:x" not in msg
        assert f"ASE's {fmt} reader" in msg and "\n" not in msg
        if fmt == "cif":  # ASE's reader fails on it: only the error's type is shown
            assert msg.endswith("notes.cif: ASE's cif reader cannot read it (no frame read): AssertionError (content "
                                "not shown: neither the name nor the first bytes of the file are cif's)"), msg
        else:  # ASE's QE reader finds no run in it
            assert msg.endswith("contains no frames (ASE's espresso-out reader found none)"), msg
    (tmp_path / "OUTCAR").write_text(" vasp.5.4.4\n POTCAR:    PAW_PBE Xq 05Jan2001\n Iteration 1(1)\n")
    with pytest.raises(FrameFormatError, match=r"OUTCAR: ASE's vasp-out reader cannot read it \(no frame read\): "
                                               r"ParseError: Found an unexpected symbol Xq"):
        read_frames(tmp_path / "OUTCAR")


def test_lammps_dump_has_forces_and_no_invented_energy(tmp_path):
    """A LAMMPS dump (found by ASE's magic, ``ITEM: TIMESTEP``) holds forces but no energy: ASE's reader sets
    energy 0.0 beside them; mlipops keeps the forces and no energy label (validate says "no energy label")."""
    step = ("ITEM: TIMESTEP\n{t}\nITEM: NUMBER OF ATOMS\n2\nITEM: BOX BOUNDS pp pp pp\n0 3.6\n0 3.6\n0 3.6\n"
            "ITEM: ATOMS id element x y z fx fy fz\n1 Cu 0 0 {z} 0.25 0 0\n2 Cu 1.8 1.8 1.8 -0.25 0 0\n")
    (tmp_path / "md.lammpstrj").write_text(step.format(t=0, z=0) + step.format(t=10, z=0.1))
    frames, bad = read_frames(tmp_path / "md.lammpstrj")
    assert bad == [] and len(frames) == 2 and list(frames[0].symbols) == ["Cu", "Cu"]
    e, f, _ = labels(frames[1])
    assert e is None
    np.testing.assert_allclose(f, [[0.25, 0, 0], [-0.25, 0, 0]])
    assert frames[1].positions[0, 2] == pytest.approx(0.1)


def test_real_mlearn_mo_by_file_with_its_stress(u_mlearn_dir, tmp_path):
    """Real PBE data (mlearn Mo, VASP): the training file split train, the test file split test, the stress from
    ``virial_stress_kbar``. Every test-file frame is test, no training frame is; physics checks the sign: of the
    strained perfect crystals (Elastic), the compressed ones have a negative ASE stress, the stretched ones a
    positive one (the trace rises with the volume)."""
    root = make_project(tmp_path, [])
    kw = {"stress_key": "virial_stress_kbar", "stress_units": "kbar", "stress_sign": "pressure_positive",
          "stress_order": "vasp"}
    frames, rejected = _ingest(root, [{"path": str(u_mlearn_dir / "Mo_training.extxyz"), "split": "train", **kw},
                                      {"path": str(u_mlearn_dir / "Mo_test.extxyz"), "split": "test", **kw}])
    assert rejected.empty
    test, train = _by_source(frames, "Mo_test"), _by_source(frames, "Mo_training")
    assert (len(test), len(train)) == (23, 194)
    assert {a.info["split"] for a in test} == {"test"} and "test" not in {a.info["split"] for a in train}
    elastic = [a for a in frames if a.info["config_type"] == "Elastic"]
    vol = np.array([a.get_volume() / len(a) for a in elastic])
    trace = np.array([labels(a)[2][:3].mean() for a in elastic])
    assert np.corrcoef(vol, trace)[0, 1] > 0.9
    assert trace[np.argmin(vol)] < 0 < trace[np.argmax(vol)]


# ---------------------------------------------------------------- stress in an extxyz field
def test_stress_key_converts_like_the_mlearn_reader(tmp_path):
    """extxyz `virial_stress_kbar` (VASP's kbar, compressive positive, xx yy zz xy yz zx): with stress_key,
    units kbar, sign pressure_positive, order vasp the ingested stress is ASE's, and equals what the mlearn
    JSON reader makes of the same numbers (one conversion for both)."""
    root = make_project(tmp_path, [])
    v = [210.13642, 180.39226, 182.85487, -6.23697, -10.00848, -0.18956]
    cell = np.eye(3) * 3.16
    pos = [[0, 0, 0], [1.58, 1.58, 1.58]]
    forces = [[0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]]
    lines = ["2", f'Lattice="{" ".join(map(str, cell.ravel()))}" Properties=species:S:1:pos:R:3:forces:R:3 '
                  f'virial_stress_kbar="{" ".join(map(str, v))}" energy=-21.5 config_type=Elastic pbc="T T T"']
    lines += [f"Mo {p[0]} {p[1]} {p[2]} {f[0]} {f[1]} {f[2]}" for p, f in zip(pos, forces)]
    (root / "raw/mo.extxyz").write_text("\n".join(lines) + "\n")
    doc = {"structure": {"lattice": {"matrix": cell.tolist()},
                         "sites": [{"species": [{"element": "Mo", "occu": 1}], "xyz": p} for p in pos]},
           "outputs": {"energy": -21.5, "forces": forces, "virial_stress": v}, "group": "Elastic"}
    (root / "raw/mo_json.json").write_text(json.dumps([doc]))
    frames, rejected = _ingest(root, [{"path": "raw/mo.extxyz", "stress_key": "virial_stress_kbar",
                                       "stress_units": "kbar", "stress_sign": "pressure_positive",
                                       "stress_order": "vasp"}])
    assert rejected.empty
    s = labels(frames[0])[2]
    np.testing.assert_allclose(s, _ase_stress_from_kbar(v), rtol=1e-9)
    assert s[:3].max() < 0  # compressed: ASE's stress negative
    ref, _ = read_frames(root / "raw/mo_json.json")
    np.testing.assert_allclose(s, labels(ref[0])[2], rtol=1e-12)
    # without stress_key the field is not a stress: no stress label (as before)
    frames, _ = _ingest(root, [{"path": "raw/mo.extxyz"}])
    assert labels(frames[0])[2] is None
    # GPa, ASE's sign and order: only the unit changes; a malformed value rejects the frame, naming the field
    bad = "\n".join(lines).replace(f'virial_stress_kbar="{" ".join(map(str, v))}"', 'virial_stress_kbar="1 2 3"')
    (root / "raw/mo.extxyz").write_text("\n".join(lines) + "\n" + bad + "\n")
    frames, rejected = _ingest(root, [{"path": "raw/mo.extxyz", "stress_key": "virial_stress_kbar",
                                       "stress_units": "GPa"}])
    np.testing.assert_allclose(labels(frames[0])[2], np.array(v) / 160.21766208, rtol=1e-9)
    assert rejected.reason.tolist() == ["raw/mo.extxyz frame 1: ValueError: field 'virial_stress_kbar': expected "
                                        "6 (Voigt) or 9 (3x3) numbers, found 3"]


# --------------------------------------------------------------------------- 2: split by file
# EMT copper lies just above 0 eV/atom: the corpus' DFT-like Cu window of make_project does not fit it
VALIDATE_EMT = {"validate__energy_per_atom_range": {"default": [-20.0, 5.0]}}


def _cu_file(path: Path, n: int, config_types: list[str], seed: int, claim_split: str | None = None,
             bad: str | None = None) -> None:
    """n labelled EMT Cu frames (fcc, rattled) cycling through config_types; those of config_type ``bad``
    get an energy of 1000 eV (out of any energy window: quarantined by validate)."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", 3.6 * (1 + rng.uniform(-0.02, 0.02)), cubic=True)
        a.positions += rng.normal(0, 0.03, a.positions.shape)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=1e3 if config_types[k % len(config_types)] == bad else e,
                                       forces=f)
        a.info["config_type"] = config_types[k % len(config_types)]
        if claim_split:
            a.info["split"] = claim_split
        out.append(a)
    ase.io.write(path, out, format="extxyz")


def test_split_by_file_test_file_is_the_test_split(tmp_path):
    """A training file (split: train) and a test file (split: test): every test-file frame is test whatever the
    file claims; no training-file frame is test, even of a config_type the rule holds out (vacancy); val is
    drawn from the training file; validate's test-split check compares against the test file's config_types,
    not copper's list, and says so."""
    root = make_project(tmp_path, [])
    _cu_file(root / "raw/train.extxyz", 40, ["Elastic", "AIMD-NVT", "vacancy"], seed=1)
    _cu_file(root / "raw/test.extxyz", 9, ["Elastic", "Vacancy", "Surface"], seed=2, claim_split="train")
    sources = [{"path": "raw/train.extxyz", "split": "train"}, {"path": "raw/test.extxyz", "split": "test"}]
    copper = ["vacancy", "surface_100", "surface_110", "surface_111", "adatom", "path_adatom", "path_dimer"]
    frames, rejected = _ingest(root, sources, ingest__split__test_config_types=copper)
    assert rejected.empty
    test = _by_source(frames, "test")
    train = _by_source(frames, "train")
    assert len(test) == 9 and {a.info["split"] for a in test} == {"test"}
    assert {a.info["file_split"] for a in test} == {"train"}  # the file's claim, kept for the record only
    assert len(train) == 40 and "test" not in {a.info["split"] for a in train}
    n_val = sum(a.info["split"] == "val" for a in train)
    assert 1 <= n_val <= 12 and {a.info["config_type"] for a in train if a.info["split"] == "val"} \
        == {"Elastic", "AIMD-NVT", "vacancy"}  # min_per_config_type: each kind has a val frame
    m = json.loads((root / "reports/ingest/metrics.json").read_text())
    assert (m["n_frames.test"], m["n_frames.val"], m["n_frames.train"]) == (9, n_val, 40 - n_val)
    summary = (root / "reports/ingest/summary.md").read_text()
    assert "Split by file: `raw/test.extxyz`, 9 frames of config_types ['Elastic', 'Surface', 'Vacancy'], test" \
        in summary
    assert "Split rule" not in summary  # no source follows the rule

    _set(root, sources, validate__expected_test_config_types=copper, **VALIDATE_EMT)
    r = mlipops(root, "validate")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr, r.stderr  # copper's config_types are not expected of this test file
    m = json.loads((root / "reports/validate/metrics.json").read_text())
    assert m["dataset_checks_failed"] == 0
    assert "expects the config_types those files hold, ['Elastic', 'Surface', 'Vacancy']" in \
        (root / "reports/validate/summary.md").read_text()


def test_test_file_kind_quarantined_is_reported(tmp_path):
    """With a test file, the dataset check still fires when a config_type of that file has no accepted frame."""
    root = make_project(tmp_path, [])
    _cu_file(root / "raw/train.extxyz", 12, ["Elastic"], seed=3)
    _cu_file(root / "raw/test.extxyz", 4, ["Elastic", "Surface"], seed=4, bad="Surface")
    sources = [{"path": "raw/train.extxyz", "split": "train"}, {"path": "raw/test.extxyz", "split": "test"}]
    _ingest(root, sources)
    _set(root, sources, **VALIDATE_EMT)
    r = mlipops(root, "validate")
    assert r.returncode == 0, r.stderr
    assert ("mlipops: warning: dataset check test_split_config_types: the test split holds no accepted frame of "
            "config_type(s) Surface (the config_types of the test file(s))") in r.stderr, r.stderr


def test_draw_splits_modes():
    """auto is the rule as before (same result with or without modes); train never test; test always test."""
    from mlipops.ingest import draw_splits
    from mlipops.params import SplitParams

    rng = np.random.default_rng(0)
    ids = [f"{rng.integers(1 << 60):x}" for _ in range(300)]
    cts = [["a", "b", "vacancy", "c"][k % 4] for k in range(300)]
    rule = SplitParams(test_config_types=["vacancy"], val_fraction=0.2, test_fraction=0.1,
                       keep_in_train={"c": 0.5})
    base = draw_splits(ids, cts, rule)
    assert draw_splits(ids, cts, rule, ["auto"] * 300) == base
    assert set(base) == {"train", "val", "test", "unused"}
    train = draw_splits(ids, cts, rule, ["train"] * 300)
    assert "test" not in train and {s for s, c in zip(train, cts) if c == "vacancy"} == {"train", "val"}
    assert sum(s == "val" for s in train) == pytest.approx(0.2 * 300, abs=20)
    assert set(draw_splits(ids, cts, rule, ["test"] * 300)) == {"test"}
    mixed = draw_splits(ids, cts, rule, ["train"] * 150 + ["test"] * 150)
    assert "test" not in mixed[:150] and set(mixed[150:]) == {"test"}
