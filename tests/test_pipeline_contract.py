"""The stage contract of :mod:`mlipops.pipeline` against ``dvc.yaml`` and the code.

* ``dvc.yaml`` has exactly the declared stages, each with the declared cmd, params keys (in order), data deps
  (every dep outside ``src/``; ingest's: each of ``ingest.sources`` and its ``.provenance.json`` where a stage
  writes that or DVC tracks it, a ``.dvc`` file beside it), outs, metrics and plots, ``cache: false`` exactly
  on the declared reports, metrics and plots. ``${...}`` is interpolated from params.yaml on both sides.
* No module of the package but ``pipeline.py`` spells a path under ``data/`` or ``reports/`` (params.py's
  defaults are params values, and params.yaml is their source); no module imports a path constant from
  another stage's package.
* The package's import graph (every import, lazy ones too) has no cycle.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path, PurePath

import yaml

from mlipops.pipeline import DATA_PLOTS, FROM_PARAMS, STAGES

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mlipops"
STAGE_PACKAGES = ("generate", "ingest", "quality", "index", "train", "evaluate", "promote", "active")
# modules that may spell a data/ or reports/ path, and why
PATH_LITERALS_ALLOWED = {
    "mlipops.pipeline": "the contract itself",
    "mlipops.params": "defaults of params that name folders (active.out_dir, active.index, ...): params values",
}
_PATH = re.compile(r"^(data|reports)/[A-Za-z0-9_.${}/-]*$")  # a path below data/ or reports/


def _interpolate(text: str, params: dict) -> str:
    def value(m):
        v = params
        for k in m.group(1).split("."):
            v = v[k]
        return str(v)
    return re.sub(r"\$\{([A-Za-z0-9_.]+)\}", value, text)


def _entries(items) -> dict[str, str]:
    """path -> "cached", "persist" or "uncached", of a dvc.yaml outs/metrics/plots/deps list."""
    out = {}
    for it in items or []:
        opts = {}
        if isinstance(it, dict):
            (it, opts), = it.items()
            opts = opts or {}
        out[str(it)] = "uncached" if not opts.get("cache", True) else "persist" if opts.get("persist") else "cached"
    return out


def contract_problems(dvc: dict, params: dict, root: Path = ROOT) -> list[str]:
    stages = dvc.get("stages") or {}
    problems = [f"stage {n!r} is in dvc.yaml but not declared in mlipops.pipeline.STAGES"
                for n in stages if n not in STAGES]
    problems += [f"stage {n!r} is declared in mlipops.pipeline.STAGES but missing from dvc.yaml"
                 for n in STAGES if n not in stages]
    outs_anywhere = {_interpolate(p, params) for s in STAGES.values() for p in s.writes()}
    for name in (n for n in STAGES if n in stages):
        want, got = STAGES[name], stages[name]
        if got.get("cmd") != want.cmd:
            problems.append(f"stage {name!r}: cmd {got.get('cmd')!r}, declared {want.cmd!r}")
        if list(got.get("params") or []) != list(want.params):
            problems.append(f"stage {name!r}: params {got.get('params')}, declared {list(want.params)}")
        reads = []
        for r in want.reads:
            if r == FROM_PARAMS:
                for src in params["ingest"]["sources"]:
                    reads.append(src["path"])
                    # its manifest, where a stage writes it or DVC tracks it (`mlipops active graduate`)
                    sidecar = src["path"] + ".provenance.json"
                    if sidecar in outs_anywhere or (root / (sidecar + ".dvc")).is_file():
                        reads.append(sidecar)
            else:
                reads.append(r)
        deps = [d for d in _entries(got.get("deps")) if not d.startswith("src/")]
        got_deps = sorted(_interpolate(d, params) for d in deps)
        if got_deps != sorted(_interpolate(r, params) for r in reads):
            problems.append(f"stage {name!r}: data deps {got_deps}, declared {sorted(reads)}")
        outs = {**{p: "cached" for p in want.outs}, **{p: "persist" for p in want.persist},
                **{p: "uncached" for p in want.reports}}
        for kind, declared in (("outs", outs), ("metrics", {p: "uncached" for p in want.metrics}),
                               ("plots", {p: "uncached" for p in want.plots})):
            g = {_interpolate(p, params): c for p, c in _entries(got.get(kind)).items()}
            d = {_interpolate(p, params): c for p, c in declared.items()}
            if g != d:
                problems.append(f"stage {name!r}: {kind} {g}, declared {d}")
    got_plots = {k: v for item in dvc.get("plots") or [] for k, v in (item.items() if isinstance(item, dict)
                                                                      else [(item, None)])}
    want_plots = {k: v.dvc() for k, v in DATA_PLOTS.items()}
    for pid in sorted(set(got_plots) | set(want_plots)):
        if got_plots.get(pid) != want_plots.get(pid):
            problems.append(f"top-level plot {pid!r}: {got_plots.get(pid)}, declared {want_plots.get(pid)}")
    reports = {r for s in STAGES.values() for r in s.reports}
    problems += [f"data plot {pid!r}: {p.file} is no stage's uncached report" for pid, p in DATA_PLOTS.items()
                 if p.file not in reports]
    return problems


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def path_literals(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    problems = []
    for mod, f in modules.items():
        if mod in PATH_LITERALS_ALLOWED:
            continue
        tree = ast.parse(f.read_text(), filename=str(f))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):  # an f-string: text for people (messages, model cards)
                skip |= {id(v) for v in node.values}
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                    and _PATH.match(node.value):
                problems.append(f"{f.relative_to(root)}:{node.lineno}: {node.value!r} (declare it in "
                                "mlipops/pipeline.py and import it from there)")
    return problems


def _resolve(mod: str, f: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line}, every import statement (lazy ones too). ``from a import
    b`` imports ``a`` and, when ``b`` is a submodule, ``a.b``; a package's ``__init__`` is counted only when the
    statement names the package itself (importing ``a.b`` runs ``a/__init__``, whose own imports are its edges)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for mod, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, f, node)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if subs and len(subs) == len(node.names) else [base] + subs
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].setdefault(t, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def _stage_of(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGE_PACKAGES else None


def upstream_path_imports(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """``from mlipops.<other stage>... import NAME`` where NAME is a path there (a :class:`~pathlib.PurePath`,
    defined or re-exported: the module is imported to tell)."""
    problems = []
    for mod, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _resolve(mod, f, node)
            if not (_stage_of(base) and _stage_of(base) != _stage_of(mod)):
                continue
            upstream = importlib.import_module(base)
            for a in node.names:
                if isinstance(getattr(upstream, a.name, None), PurePath):
                    problems.append(f"{f.relative_to(root)}:{node.lineno}: {a.name} from {base} (a path of "
                                    "another stage: take it from mlipops.pipeline)")
    return problems


# ------------------------------------------------------------------------------------------------ the tests


def test_dvc_yaml_is_the_declared_pipeline():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    problems = contract_problems(dvc, params)
    assert not problems, "dvc.yaml and mlipops.pipeline.STAGES disagree:\n" + "\n".join(problems)


def test_a_dvc_tracked_source_manifest_is_an_ingest_dep(tmp_path):
    """A graduated campaign's source (`mlipops active graduate`): its DVC-tracked manifest (a ``.dvc`` file beside
    it) must be an ingest dep, as a stage-written one is; without the ``.dvc`` file it need not be."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    src = "data/raw/active_0123abcd.extxyz"
    params["ingest"]["sources"].append({"path": src, "split": "train"})
    dvc["stages"]["ingest"]["deps"].append(src)
    assert not contract_problems(dvc, params, tmp_path)
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / f"{src}.provenance.json.dvc").write_text("outs: []\n")
    assert any("'ingest': data deps" in p for p in contract_problems(dvc, params, tmp_path))
    dvc["stages"]["ingest"]["deps"].append(f"{src}.provenance.json")
    assert not contract_problems(dvc, params, tmp_path)


def test_every_untracked_key_has_its_reason():
    from mlipops.pipeline import UNTRACKED

    for name, stage in STAGES.items():
        assert set(stage.untracked) <= set(UNTRACKED), (name, stage.untracked)
        assert not set(stage.untracked) & set(stage.params), name


def test_only_the_contract_spells_data_and_report_paths():
    problems = path_literals(_modules())
    assert not problems, "paths outside mlipops/pipeline.py:\n" + "\n".join(problems)


def test_no_stage_imports_another_stages_paths():
    problems = upstream_path_imports(_modules())
    assert not problems, "\n".join(problems)


def test_the_import_graph_has_no_cycle():
    graph = import_graph(_modules())
    found = cycles(graph)
    lines = []
    for comp in found:
        edges = [f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in graph[a] if b in comp]
        lines.append("cycle: " + "; ".join(edges))
    assert not found, "\n".join(lines)


def test_the_checks_catch_what_they_should(tmp_path):
    """Each check fails on a hand-made violation (so a passing run means something)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc["stages"]["train"]["outs"].append("data/models/extra")
    dvc["stages"]["index"]["deps"].append("data/elsewhere.extxyz")
    dvc["stages"]["nve"]["params"].append("train.epochs")
    del dvc["stages"]["bo_scan"]
    dvc["plots"][0]["learning_curve_forces"]["x"] = "step"
    problems = "\n".join(contract_problems(dvc, params))
    for expected in ("'train': outs", "'index': data deps", "'nve': params", "'bo_scan' is declared",
                     "top-level plot 'learning_curve_forces'"):
        assert expected in problems

    pkg = tmp_path / "mlipops"
    (pkg / "train").mkdir(parents=True)
    (pkg / "evaluate").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "evaluate" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text('from pathlib import Path\nMODELS = Path("data/models")\n'
                                           "def f():\n    from mlipops.evaluate.a import g\n")
    (pkg / "evaluate" / "a.py").write_text('"""data/x is fine in a docstring."""\n'
                                           "from mlipops.train.loop import MODELS\n"
                                           'def g():\n    return f"data/{1}"\n')
    mods = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(tmp_path).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    lits = path_literals(mods, tmp_path)
    ups = []
    sys.path.insert(0, str(tmp_path))
    saved = {k: v for k, v in sys.modules.items() if k == "mlipops" or k.startswith("mlipops.")}
    try:
        for k in saved:
            del sys.modules[k]
        ups = upstream_path_imports(mods, tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
        for k in [k for k in sys.modules if k == "mlipops" or k.startswith("mlipops.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert len(lits) == 1 and "'data/models'" in lits[0]
    assert len(ups) == 1 and "MODELS from mlipops.train.loop" in ups[0]
    assert cycles(import_graph(mods)) == [["mlipops.evaluate.a", "mlipops.train.loop"]]


def test_no_module_prints_and_the_log_has_one_handler(capsys):
    """Modules log through ``logging`` (mlipops.log's one handler), never ``print``; the CLI's own output goes
    through typer/rich. :func:`mlipops.log.setup` twice is still one handler, on the current stderr."""
    import logging

    from mlipops.log import _Stderr, setup

    prints = []
    for mod, f in _modules().items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                prints.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not prints, "print() in the package (use logging.getLogger(__name__)): " + ", ".join(prints)
    setup()
    logger = setup()
    # one handler of ours (pytest's log capture may add its own to the logger)
    assert sum(isinstance(h, _Stderr) for h in logger.handlers) == 1 and not logger.propagate
    logging.getLogger("mlipops.some.module").warning("half the frames lack stress")
    logging.getLogger("mlipops.some.module").info("resuming")
    assert capsys.readouterr().err == "mlipops: warning: half the frames lack stress\nmlipops: resuming\n"


def test_every_stage_command_runs_its_declared_entry_point():
    """The CLI function of each stage's command (tests/test_dvc_contract.py's map of cli.py) imports the declared
    ``module:run`` (``from module import run``, or the module, then ``module.run``), which exists."""
    from test_dvc_contract import Cli, Package, _commands

    pkg = Package(ROOT / "src")
    cli = Cli(pkg)
    problems = []
    for name, stage in STAGES.items():
        module, func = stage.entry.split(":")
        if func != "run" or not callable(getattr(importlib.import_module(module), func, None)):
            problems.append(f"stage {name!r}: entry {stage.entry} is not a function named run")
            continue
        (argv,) = _commands(stage.cmd)
        called = False
        for f in cli.resolve(argv[1:]):
            for node in ast.walk(f):
                if isinstance(node, ast.ImportFrom) and node.module == module and \
                        any(a.name == func for a in node.names):
                    called = True
                if isinstance(node, ast.ImportFrom) and any(f"{node.module}.{a.name}" == module for a in node.names):
                    alias = next(a.asname or a.name for a in node.names if f"{node.module}.{a.name}" == module)
                    called |= any(isinstance(c, ast.Attribute) and c.attr == func and isinstance(c.value, ast.Name)
                                  and c.value.id == alias for c in ast.walk(f))
        if not called:
            problems.append(f"stage {name!r}: `{stage.cmd}` does not import {stage.entry}")
    assert not problems, "\n".join(problems)
