"""Contract between dvc.yaml and the code: every stage whose ``cmd`` is an ``mlipops`` command lists in its
``deps`` every file of ``src/mlipops`` that the command can run, so that changing any of them re-runs the stage.

Static, with :mod:`ast`. The command is mapped to its function in ``cli.py`` through the Typer decorators
(``@app.command()``, ``@evaluate_app.command("defects")``, ``@generate_app.callback(...)``) and
``add_typer(..., name=...)``: nothing is listed by hand. The function's imports (and those of the cli helpers it
calls, e.g. ``_params`` -> ``mlipops.params``) are followed transitively: ``import mlipops.x``, ``from mlipops.x
import y`` (``y`` a submodule too), relative imports, ``importlib.import_module("mlipops.x")``, and imports inside
function bodies (they run when the function runs; a module's unused function is counted: the closure is the
modules, not the calls). Importing a submodule runs its packages' ``__init__.py``: they are in the closure.
Package data read next to a module (``Path(__file__).with_name("schema.sql")``) counts as code. Imports under
``if TYPE_CHECKING:`` never run and are skipped. A dep that is a directory covers every file below it.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOP = "mlipops"

# Shared infrastructure that a stage need not list: none. Every candidate can change what a stage writes:
#   cli.py       the command bodies choose the params sections passed to each stage, and `active run` resolves
#                the model and the oracle there
#   __init__.py  __version__ is written into the index (index/build.py)
#   errors.py    MlipopsError's message format is written into outputs (a failed melting run's rejected_reason
#                in data/melting/reference.json)
#   params.py    validates and defaults every value a stage reads
#   report.py    writes every metrics.json and summary.md
#   compute.py   the Dask workers' thread settings, on which floating-point sums depend
# A module excused here must be one whose change cannot change any stage's outputs; say why.
EXCUSED_MODULES: dict[str, str] = {}


@dataclass(frozen=True)
class Excused:
    """An import that the stages' commands never execute, with the reason; ``importer`` is a module of the
    package, or ``cli.<function>()`` for a command's own import. ``stages``: those it is excused for (() = all).
    The closure of ``imported`` still counts wherever another import pulls it in."""

    importer: str
    imported: str
    why: str
    stages: tuple[str, ...] = ()

    def applies(self, stage: str, importer: str, imported: str) -> bool:
        return (importer, imported) == (self.importer, self.imported) and (not self.stages or stage in self.stages)


EXCUSED_IMPORTS: list[Excused] = [
    Excused("mlipops.params", "mlipops.evaluate.melting",
            "MeltingParams.settings() builds the CoexistenceSettings of evaluate/melting.py; only the melting stages "
            "call it, and they import evaluate.melting themselves. Followed, it would make every stage (generate "
            "included) depend on all of evaluate/ and on everything evaluate/__init__.py imports."),
    Excused("cli.evaluate_melting()", "mlipops.evaluate.melting_stage",
            "`evaluate melting --reference` runs melting_reference.run only; the command imports "
            "melting_stage in the same line for the members' branch (melting_stage defines functions and "
            "constants, runs nothing at import). Listed, every change to the members' evaluation would re-run the "
            "expensive cached reference.", stages=("melting_reference",)),
]


# --------------------------------------------------------------------------------------------- the analysis


@dataclass
class Link:
    """How a module enters a closure: imported by ``parent`` (a module name, or ``cli.<function>()``) at ``line``,
    by a statement that names the module ``named`` (``from mlipops.a.b import f`` names mlipops.a.b, and imports
    mlipops and mlipops.a with it)."""

    parent: str
    line: int
    named: str = ""


@dataclass
class Closure:
    files: dict[Path, str] = field(default_factory=dict)  # file -> the module (or data file) that is it
    links: dict[str, Link] = field(default_factory=dict)  # module -> how it was reached

    def chain(self, name: str) -> str:
        """``mlipops evaluate nve -> cli.evaluate_nve():162 -> mlipops.evaluate.nve:123 -> mlipops.train``: each
        step imports the next at that line."""
        steps = [name]
        while name in self.links:
            link = self.links[name]
            steps.append(f"{link.parent}:{link.line}" if link.line else link.parent)
            name = link.parent
        return " -> ".join(reversed(steps))


class Package:
    """The modules of ``top`` under ``src`` and the imports each one can execute."""

    def __init__(self, src: Path, top: str = TOP):
        self.src, self.top = src, top
        self._imports: dict[str, list[tuple[str, Link]]] = {}
        self._trees: dict[str, ast.Module] = {}
        self._data: dict[str, list[tuple[Path, int]]] = {}

    def file(self, mod: str) -> Path | None:
        p = self.src.joinpath(*mod.split("."))
        if (p / "__init__.py").is_file():
            return p / "__init__.py"
        if p.with_suffix(".py").is_file():
            return p.with_suffix(".py")
        return None

    def is_package(self, mod: str) -> bool:
        f = self.file(mod)
        return f is not None and f.name == "__init__.py"

    def targets(self, name: str, names: list[str] = ()) -> list[tuple[str, str]]:
        """(module, named) of the modules that ``from name import *names`` (or ``import name``) executes:
        ``name`` and its parent packages (named ``name``), and each of ``names`` that is a submodule."""
        if name != self.top and not name.startswith(self.top + "."):
            return []
        parts = name.split(".")
        out = [(".".join(parts[:k]), name) for k in range(1, len(parts) + 1)]
        out += [(f"{name}.{n}",) * 2 for n in names if n != "*"]
        return [(m, n) for m, n in out if self.file(m) is not None]

    def resolve_from(self, mod: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = mod.split(".") if self.is_package(mod) else mod.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def imports_of(self, mod: str, nodes: list[ast.AST], *, into_functions: bool = True) -> list[tuple[str, Link]]:
        """(module, how) of every import of ``top`` in ``nodes`` of module ``mod`` (their subtrees; function
        bodies too unless ``into_functions`` is False), skipping ``if TYPE_CHECKING:`` blocks."""
        out: list[tuple[str, Link]] = []
        stack = list(reversed(nodes))
        while stack:
            node = stack.pop()
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                stack.extend(reversed(node.orelse))
                continue
            if not into_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    out += [(m, Link(mod, node.lineno, n)) for m, n in self.targets(a.name)]
            elif isinstance(node, ast.ImportFrom):
                name = self.resolve_from(mod, node)
                out += [(m, Link(mod, node.lineno, n)) for m, n in self.targets(name, [a.name for a in node.names])]
            elif isinstance(node, ast.Call) and _is_dynamic_import(node):
                out += [(m, Link(mod, node.lineno, n)) for m, n in self.targets(node.args[0].value)]
            stack.extend(reversed(list(ast.iter_child_nodes(node))))
        return out

    def tree(self, mod: str) -> ast.Module:
        if mod not in self._trees:
            self._trees[mod] = ast.parse(self.file(mod).read_text(), filename=str(self.file(mod)))
        return self._trees[mod]

    def imports(self, mod: str) -> list[tuple[str, Link]]:
        if mod not in self._imports:
            self._imports[mod] = self.imports_of(mod, [self.tree(mod)])
        return self._imports[mod]

    def data_files(self, mod: str) -> list[tuple[Path, int]]:
        """Non-Python files next to the module that it names in a string constant (package data it reads,
        e.g. ``Path(__file__).with_name("schema.sql")``)."""
        if mod in self._data:
            return self._data[mod]
        here, out = self.file(mod).parent, []
        for node in ast.walk(self.tree(mod)):
            v = node.value if isinstance(node, ast.Constant) else None
            if isinstance(v, str) and 0 < len(v) < 200 and not any(c in v for c in "\n\0/") and not v.endswith(".py"):
                try:
                    if (here / v).is_file():
                        out.append((here / v, node.lineno))
                except (OSError, ValueError):
                    pass
        self._data[mod] = out
        return out

    def closure(self, entries: list[tuple[str, Link]], opaque: frozenset[str] = frozenset(),
                skip: Callable[[str, str], bool] = lambda importer, imported: False) -> Closure:
        """Every module (and package data file) reachable from ``entries`` (breadth first: each chain is a
        shortest one). The imports of an ``opaque`` module (cli.py: :class:`Cli` gives the command's own) are
        not followed, nor the import statements for which ``skip(importer, named module)``."""
        c, todo = Closure(), deque()
        for mod, link in entries:
            if mod not in c.links and not skip(link.parent, link.named or mod):
                c.links[mod] = link
                if self.file(mod) is not None:  # else a step of the chains only, e.g. cli.train()
                    todo.append(mod)
        while todo:
            mod = todo.popleft()
            c.files[self.file(mod)] = mod
            if mod in opaque:
                continue
            for p, line in self.data_files(mod):
                label = p.relative_to(self.src).as_posix()
                c.files.setdefault(p, label)
                c.links.setdefault(label, Link(mod, line))
            for m, link in self.imports(mod):
                if m not in c.links and not skip(mod, link.named):
                    c.links[m] = link
                    todo.append(m)
        return c


def _is_type_checking(test: ast.AST) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_dynamic_import(node: ast.Call) -> bool:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return name in ("import_module", "__import__") and bool(node.args) and \
        isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)


@dataclass
class Group:
    """A Typer app: its subgroups and commands by CLI name, and its callback (run before any subcommand)."""

    var: str
    groups: dict[str, str] = field(default_factory=dict)
    commands: dict[str, ast.FunctionDef] = field(default_factory=dict)
    callback: ast.FunctionDef | None = None


class Cli:
    """The Typer command tree of ``cli.py``, read with ast."""

    def __init__(self, pkg: Package, module: str = f"{TOP}.cli"):
        self.pkg, self.module = pkg, module
        tree = pkg.tree(module)
        self.functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.groups: dict[str, Group] = {}
        for n in tree.body:
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and _callee(n.value.func) == "Typer":
                for t in n.targets:
                    if isinstance(t, ast.Name):
                        self.groups[t.id] = Group(t.id)
        children = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_typer" \
                    and isinstance(n.func.value, ast.Name) and n.func.value.id in self.groups \
                    and n.args and isinstance(n.args[0], ast.Name) and n.args[0].id in self.groups:
                name = _keyword(n, "name")
                if name is not None:
                    self.groups[n.func.value.id].groups[name] = n.args[0].id
                children.add(n.args[0].id)
        for f in self.functions.values():
            for d in f.decorator_list:
                call = d if isinstance(d, ast.Call) else None
                target = call.func if call else d
                if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id in self.groups):
                    continue
                g = self.groups[target.value.id]
                if target.attr == "command":
                    name = (_keyword(call, "name") or (_const(call.args[0]) if call and call.args else None)) \
                        if call else None
                    g.commands[name or f.name.lower().replace("_", "-")] = f
                elif target.attr == "callback":
                    g.callback = f
        roots = [g for g in self.groups if g not in children]
        assert len(roots) == 1, f"{module}: expected one root Typer app, found {roots}"
        self.root = roots[0]
        self.module_imports = pkg.imports_of(module, [tree], into_functions=False)

    def resolve(self, argv: list[str]) -> list[ast.FunctionDef]:
        """The functions that ``mlipops *argv`` runs: the group callbacks on the way (unless they only return
        when a subcommand is invoked) and the command. Raises LookupError when it cannot tell."""
        g, run = self.groups[self.root], []
        args = list(argv)
        while True:
            if args and args[0].startswith("-"):
                sub = [a for a in args if a in g.groups or a in g.commands]
                if sub:
                    raise LookupError(f"option {args[0]!r} before the subcommand {sub[0]!r}: cannot tell an "
                                      "option's value from a subcommand; put the options after the subcommand")
            word = args[0] if args and not args[0].startswith("-") else None
            if word is None:
                if g.callback is None:
                    raise LookupError(f"the {g.var} group has no callback to run without a subcommand")
                return run + [g.callback]
            if word not in g.groups and word not in g.commands:
                raise LookupError(f"no command {word!r} in the {g.var} group "
                                  f"(commands: {sorted(g.commands) + sorted(g.groups)})")
            args = args[1:]
            if g.callback is not None and not _dispatch_only(g.callback):
                run.append(g.callback)
            if word in g.commands:
                return run + [g.commands[word]]
            g = self.groups[g.groups[word]]

    def entries(self, argv: list[str]) -> list[tuple[str, Link]]:
        """The modules that ``mlipops *argv`` imports, with how: cli.py itself, its module-level imports, the
        imports of the functions :meth:`resolve` gives (all of a function's body, lazily imported or not) and
        those of the cli helpers they call (``_params``)."""
        command = " ".join([TOP, *argv])
        out = [(self.module, Link(command, 0))]
        out += self.module_imports
        seen: set[str] = set()
        todo = list(self.resolve(argv))
        while todo:
            f = todo.pop()
            if f.name in seen:
                continue
            seen.add(f.name)
            out.append((f"cli.{f.name}()", Link(command, 0)))
            out += [(m, Link(f"cli.{f.name}()", link.line, link.named))
                    for m, link in self.pkg.imports_of(self.module, f.body)]
            todo += [self.functions[n.func.id] for n in ast.walk(f) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Name) and n.func.id in self.functions]
        return out


def _callee(f: ast.AST) -> str | None:
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _const(n: ast.AST):
    return n.value if isinstance(n, ast.Constant) else None


def _keyword(call: ast.Call, name: str):
    return next((_const(k.value) for k in call.keywords if k.arg == name), None)


def _dispatch_only(f: ast.FunctionDef) -> bool:
    """A group callback that starts with ``if ctx.invoked_subcommand is not None: return``."""
    body = [s for s in f.body if not (isinstance(s, ast.Expr) and isinstance(_const(s.value), str))]
    if not body or not isinstance(body[0], ast.If):
        return False
    t = body[0].test
    return isinstance(t, ast.Compare) and isinstance(t.left, ast.Attribute) and t.left.attr == "invoked_subcommand" \
        and len(t.ops) == 1 and isinstance(t.ops[0], ast.IsNot) and _const(t.comparators[0]) is None \
        and isinstance(t.comparators[0], ast.Constant) \
        and len(body[0].body) == 1 and isinstance(body[0].body[0], ast.Return) and body[0].body[0].value is None


def _commands(cmd) -> list[list[str]]:
    """The argv of each ``mlipops`` command in a stage's cmd (a string or a list; ``&&``/``;`` chains)."""
    out = []
    for c in ([cmd] if isinstance(cmd, str) else list(cmd)):
        words, cur = shlex.split(c, posix=True), []
        for w in words + ["&&"]:
            if w in ("&&", ";", "||", "|"):
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(w)
    return out


def _dep_paths(stage: dict) -> list[str]:
    out = []
    for d in stage.get("deps") or []:
        for p in (d if isinstance(d, dict) else {d: None}):
            out.append(os.path.normpath(str(p)).rstrip("/"))
    return out


def contract_problems(root: Path, dvc: dict, excused_modules: dict[str, str] = EXCUSED_MODULES,
                      excused_imports: list[Excused] = EXCUSED_IMPORTS) -> list[str]:
    """One line per (stage, file of its command's closure missing from its deps), with the import chain, and
    per stage command that cannot be mapped to a function of cli.py."""
    pkg = Package(root / "src")
    cli = Cli(pkg)
    problems = []
    for name, stage in (dvc.get("stages") or {}).items():
        if "cmd" not in stage:
            problems.append(f"stage {name!r}: no cmd (foreach/matrix stage): the contract test cannot expand it")
            continue
        deps = _dep_paths(stage)
        problems += [f"stage {name!r}: dep {d} does not exist" for d in deps
                     if d.startswith(f"src/{TOP}") and not (root / d).exists()]
        for argv in _commands(stage["cmd"]):
            if not any(TOP in w for w in argv):
                continue
            if argv[0] != TOP:
                problems.append(f"stage {name!r}: cmd {' '.join(argv)!r} runs {TOP} code but not as the `{TOP}` "
                                "command: the contract test cannot map it")
                continue
            try:
                entries = cli.entries(argv[1:])
            except LookupError as exc:
                problems.append(f"stage {name!r}: cannot map {' '.join(argv)!r} to a command of cli.py: {exc}")
                continue
            c = pkg.closure(entries, frozenset({cli.module}), lambda importer, imported, stage=name: any(
                e.applies(stage, importer, imported) for e in excused_imports))
            for path, mod in sorted(c.files.items()):
                rel = path.relative_to(root).as_posix()
                if mod in excused_modules or any(rel == d or rel.startswith(d + "/") for d in deps):
                    continue
                problems.append(f"stage {name!r}: {rel} is missing from deps; imported by {c.chain(mod)}")
    return problems


# ------------------------------------------------------------------------------------------------ the tests


def unneeded_code_deps(root: Path, dvc: dict, excused_imports: list[Excused] = EXCUSED_IMPORTS) -> list[str]:
    """One line per code dep (a file or directory under src/) of which the stage's command runs nothing:
    changing it would re-run the stage (the melting reference takes minutes) for no reason."""
    pkg = Package(root / "src")
    cli = Cli(pkg)
    problems = []
    for name, stage in (dvc.get("stages") or {}).items():
        files: set[str] = set()
        for argv in _commands(stage.get("cmd", "")):
            if not argv or argv[0] != TOP:
                continue
            c = pkg.closure(cli.entries(argv[1:]), frozenset({cli.module}), lambda importer, imported, stage=name: any(
                e.applies(stage, importer, imported) for e in excused_imports))
            files |= {path.relative_to(root).as_posix() for path in c.files}
        if not files:
            continue
        problems += [f"stage {name!r}: dep {d} holds no code its command runs" for d in _dep_paths(stage)
                     if d.startswith(f"src/{TOP}") and not any(f == d or f.startswith(d + "/") for f in files)]
    return problems


def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_no_stage_depends_on_code_it_does_not_run():
    problems = unneeded_code_deps(ROOT, _dvc())
    assert not problems, "dvc.yaml: code deps that only cause needless re-runs:\n" + "\n".join(problems)


def test_every_stage_lists_the_code_its_command_runs():
    problems = contract_problems(ROOT, _dvc())
    assert not problems, "dvc.yaml: stages whose deps miss code their command runs (add the file or its " \
        "directory to the stage's deps):\n" + "\n".join(problems)


def test_every_excusal_is_current():
    """An excused module exists; an excused import is still made (a stale excusal goes away with the code it
    was for) and names stages of dvc.yaml; each says why."""
    pkg, stages = Package(ROOT / "src"), _dvc()["stages"]
    assert all(pkg.file(m) is not None and why for m, why in EXCUSED_MODULES.items()), EXCUSED_MODULES
    cli = Cli(pkg)
    for e in EXCUSED_IMPORTS:
        assert e.why and set(e.stages) <= set(stages), e
        if e.importer.startswith("cli.") and e.importer.endswith("()"):
            f = cli.functions.get(e.importer[4:-2])
            made = {link.named for _, link in pkg.imports_of(cli.module, f.body)} if f else set()
        else:
            made = {link.named for _, link in pkg.imports(e.importer)} if pkg.file(e.importer) else set()
        assert e.imported in made, f"{e.importer} no longer imports {e.imported}: remove its excusal"


# The analysis itself, on a small package: what it must find, and what it must not require.
MINI = {
    "__init__.py": '__version__ = "1"\n',
    "errors.py": "class E(Exception):\n    pass\n",
    "params.py": "def load(p):\n    return p\n",
    "cli.py": '''
import typer
from mlipops.errors import E

app = typer.Typer()
sub_app = typer.Typer()
app.add_typer(sub_app, name="sub")
tools_app = typer.Typer()
app.add_typer(tools_app, name="tools")


def _params(p):
    from mlipops.params import load
    return load(p)


@app.command()
def make_data(p: str = "x"):
    from mlipops.a import core
    core.run(_params(p))


@sub_app.callback(invoke_without_command=True)
def sub(ctx: typer.Context):
    """Dispatches: runs nothing when a subcommand is invoked."""
    if ctx.invoked_subcommand is not None:
        return
    from mlipops.b import helper


@sub_app.command("leaf")
def sub_leaf():
    import mlipops.c


@tools_app.callback()
def tools(p: str = "x"):
    import mlipops.f


@tools_app.command(name="go")
def tools_go():
    pass
''',
    "a/__init__.py": "",
    "a/core.py": '''
from __future__ import annotations
from typing import TYPE_CHECKING
from . import util
if TYPE_CHECKING:
    from mlipops.d import Never
SCHEMA = "schema.sql"


def run(x):
    from ..b.helper import f
    return f(util.g(x))
''',
    "a/util.py": "def g(x):\n    import importlib\n    return importlib.import_module('mlipops.e')\n",
    "a/schema.sql": "CREATE TABLE t (x INT);\n",
    "b/__init__.py": "",
    "b/helper.py": "def f(x):\n    return x\n",
    "c.py": "",
    "d.py": "class Never:\n    pass\n",
    "e.py": "",
    "f.py": "",
}


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    for rel, text in MINI.items():
        p = tmp_path / "src" / TOP / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_closure_follows_lazy_relative_dynamic_imports_and_package_data(mini: Path):
    pkg = Package(mini / "src")
    cli = Cli(pkg)
    c = pkg.closure(cli.entries(["make-data", "--p", "y"]), frozenset({cli.module}))
    # not d.py (TYPE_CHECKING only), nor c.py, f.py, b via cli.sub() (other commands' imports)
    assert sorted(p.relative_to(mini / "src" / TOP).as_posix() for p in c.files) == [
        "__init__.py", "a/__init__.py", "a/core.py", "a/schema.sql", "a/util.py", "b/__init__.py", "b/helper.py",
        "cli.py", "e.py", "errors.py", "params.py"]
    assert c.chain("mlipops.e") == \
        "mlipops make-data --p y -> cli.make_data():19 -> mlipops.a.core:4 -> mlipops.a.util:3 -> mlipops.e"
    assert c.chain("mlipops/a/schema.sql") == \
        "mlipops make-data --p y -> cli.make_data():19 -> mlipops.a.core:7 -> mlipops/a/schema.sql"
    assert c.chain("mlipops.params") == "mlipops make-data --p y -> cli._params():13 -> mlipops.params"


def test_missing_deps_name_stage_file_and_chain_and_an_unmapped_command_fails(mini: Path):
    src = "src/mlipops"
    base = [f"{src}/{f}" for f in ("__init__.py", "cli.py", "errors.py")]
    full = base + [f"{src}/{f}" for f in ("params.py", "a/", "b", "e.py")]
    dvc = {"stages": {
        "ok": {"cmd": "mlipops make-data -p x.yaml", "deps": full + ["data/x"]},
        "gone": {"cmd": "mlipops sub leaf", "deps": base + [f"{src}/c.py", f"{src}/old.py"]},
        "short": {"cmd": "mlipops make-data", "deps": [d for d in full if d != f"{src}/b"]},
        "leaf": {"cmd": "mlipops sub leaf --flag", "deps": base + [f"{src}/c.py"]},
        "callback": {"cmd": "mlipops sub", "deps": base + [f"{src}/b/__init__.py"]},
        "tools": {"cmd": "mlipops tools go", "deps": base},
        "unknown": {"cmd": "mlipops sub nope", "deps": []},
        "option_first": {"cmd": "mlipops sub --x leaf", "deps": []},
        "module": {"cmd": "python -m mlipops.cli make-data", "deps": []},
        "chain": {"cmd": "echo hi && mlipops sub leaf", "deps": base},
        "other": {"cmd": "echo hi", "deps": []},
    }}
    assert contract_problems(mini, dvc, {}, []) == [
        "stage 'gone': dep src/mlipops/old.py does not exist",
        "stage 'short': src/mlipops/b/__init__.py is missing from deps; imported by "
        "mlipops make-data -> cli.make_data():19 -> mlipops.a.core:11 -> mlipops.b",
        "stage 'short': src/mlipops/b/helper.py is missing from deps; imported by "
        "mlipops make-data -> cli.make_data():19 -> mlipops.a.core:11 -> mlipops.b.helper",
        "stage 'callback': src/mlipops/b/helper.py is missing from deps; imported by "
        "mlipops sub -> cli.sub():28 -> mlipops.b.helper",
        "stage 'tools': src/mlipops/f.py is missing from deps; imported by "
        "mlipops tools go -> cli.tools():38 -> mlipops.f",
        "stage 'unknown': cannot map 'mlipops sub nope' to a command of cli.py: no command 'nope' in the sub_app "
        "group (commands: ['leaf'])",
        "stage 'option_first': cannot map 'mlipops sub --x leaf' to a command of cli.py: option '--x' before the "
        "subcommand 'leaf': cannot tell an option's value from a subcommand; put the options after the subcommand",
        "stage 'module': cmd 'python -m mlipops.cli make-data' runs mlipops code but not as the `mlipops` command: "
        "the contract test cannot map it",
        "stage 'chain': src/mlipops/c.py is missing from deps; imported by mlipops sub leaf -> cli.sub_leaf():33 "
        "-> mlipops.c",
    ]
    # excusals: a module for every stage; an import of a module, or of a command, for the stages named
    short = {"stages": {"short": dvc["stages"]["short"]}}
    assert contract_problems(mini, short, {"mlipops.b": "why", "mlipops.b.helper": "why"}, []) == []
    assert contract_problems(mini, short, {}, [Excused("mlipops.a.core", "mlipops.b.helper", "why")]) == []
    assert contract_problems(mini, short, {}, [Excused("mlipops.a.core", "mlipops.b.helper", "why", ("ok",))])
    tools = {"stages": {"tools": dvc["stages"]["tools"]}}
    assert contract_problems(mini, tools, {}, [Excused("cli.tools()", "mlipops.f", "why", ("tools",))]) == []


# ------------------------------------------------------------------------------ rewriting dvc.yaml's code deps


def code_deps(root: Path, stage_name: str, cmd, excused_imports: list[Excused] = EXCUSED_IMPORTS) -> list[str]:
    """The code deps a stage needs: its commands' closure, a package directory where every file below it is in
    the closure, else the files; sorted with directories first."""
    pkg = Package(root / "src")
    cli = Cli(pkg)
    files: set[str] = set()
    for argv in _commands(cmd):
        if argv and argv[0] == TOP:
            c = pkg.closure(cli.entries(argv[1:]), frozenset({cli.module}), lambda importer, imported: any(
                e.applies(stage_name, importer, imported) for e in excused_imports))
            files |= {path.relative_to(root).as_posix() for path in c.files}
    src = root / "src" / TOP

    def members(d: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    dirs = []
    for d in sorted(p for p in src.rglob("*") if p.is_dir() and (p / "__init__.py").is_file()):
        if any(str(d).startswith(str(x) + "/") for x in dirs):
            continue
        if members(d) <= files:
            dirs.append(d)
    covered = set().union(*(members(d) for d in dirs)) if dirs else set()
    rel_dirs = [d.relative_to(root).as_posix() for d in dirs]
    return rel_dirs + sorted(files - covered)


def rewrite_code_deps(root: Path = ROOT) -> str:
    """dvc.yaml with each mlipops stage's ``src/`` deps replaced by :func:`code_deps` (the rest of the file,
    comments included, kept): ``python tests/test_dvc_contract.py --write`` after moving code between modules."""
    lines = (root / "dvc.yaml").read_text().splitlines(keepends=True)
    stages = yaml.safe_load("".join(lines))["stages"]
    out, stage, in_deps, inserted = [], None, False, False
    for line in lines:
        m = re.match(r"^  ([A-Za-z0-9_]+):", line)
        if m and m.group(1) in stages:
            stage, in_deps, inserted = m.group(1), False, False
        if stage and re.match(r"^    deps:", line):
            in_deps = True
            out.append(line)
            continue
        if in_deps and not line.startswith("      ") and line.strip():
            in_deps = False
        if in_deps and re.match(r"^      - src/", line):
            if not inserted:
                out += [f"      - {d}\n" for d in code_deps(root, stage, stages[stage]["cmd"])]
                inserted = True
            continue
        out.append(line)
    return "".join(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_dvc_contract.py --write   (rewrites dvc.yaml's code deps)")
    (ROOT / "dvc.yaml").write_text(rewrite_code_deps())
