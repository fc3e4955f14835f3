"""The ``mlipops`` command line: one command per pipeline stage (the ``dvc.yaml`` stage commands),
plus ``query`` (read-only SQL on the coverage index), ``report`` (a registered version's HTML page) and ``ui`` (the
MLflow UI)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import typer

from mlipops.errors import MlipopsError, StageInputError
from mlipops.pipeline import ACCEPTED, DEFECTS_REPORTS, INDEX, MELTING_BRACKET_REPORTS, MODELS_DIR

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mlipops: versioned MLIP data, coverage index, training, validation, registry.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (one section per stage)")


def _params(path: Path):
    from mlipops.params import TRACE_ENV, load_params, trace_reads

    if os.environ.get(TRACE_ENV):  # tests: which params keys this command reads (see mlipops.params)
        trace_reads(os.environ[TRACE_ENV])
    return load_params(path)


def _done(stage: str, metrics: dict) -> None:
    from rich.console import Console

    keys = [k for k in metrics if "." not in k][:8]
    Console(stderr=True).print(f"[bold green]{stage}[/] done: " + ", ".join(f"{k}={metrics[k]}" for k in keys))


generate_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                           help="Build the embedded default dataset; `bo-scan` for Born-Oppenheimer-aware sampling.")
app.add_typer(generate_app, name="generate")


@generate_app.callback(invoke_without_command=True)
def generate(ctx: typer.Context, params: Path = ParamsOpt):
    """Build the embedded default dataset (recipes in params.yaml), labelled by the oracle."""
    if ctx.invoked_subcommand is not None:
        return
    from mlipops.generate.recipes import run

    _done("generate", run(_params(params).generate))


@generate_app.command("bo-scan")
def generate_bo_scan(ctx: typer.Context, params: Path = typer.Option(
        None, "--params", "-p", help="params file (default: the one given to `generate`, else params.yaml)")):
    """Map the ground/first-excited gap along a path (adaptive scan, PySCF), mark where it falls below
    ε_BO, sample training frames up to a margin before it and label the frames inside `bo_breakdown`
    (params section bo_scan; data/raw/bo_scan_<name>.extxyz, reports/generate/bo_scan/)."""
    from mlipops.generate.bo_aware import run

    params = params or (ctx.parent.params.get("params") if ctx.parent else None) or Path("params.yaml")
    _done("generate bo-scan", run(_params(params).bo_scan))


@app.command()
def ingest(params: Path = ParamsOpt):
    """Read every source, canonicalize, de-duplicate (recorded), assign splits."""
    from mlipops.ingest import run

    _done("ingest", run(_params(params).ingest))


@app.command()
def validate(params: Path = ParamsOpt):
    """Run the great-expectations suite; quarantine failing frames with their reason."""
    from mlipops.quality.validate import run

    p = _params(params)
    _done("validate", run(p.validate_, p.descriptors, p.ingest))


@app.command()
def index(params: Path = ParamsOpt):
    """Build the DuckDB coverage index data/index.duckdb."""
    from mlipops.index.build import run

    p = _params(params)
    _done("index", run(p.index, p.descriptors))


@app.command()
def train(params: Path = ParamsOpt):
    """Train the ensemble on the curated train split (Dask, MLflow); resumes an interrupted run."""
    from mlipops.train.run import run

    p = _params(params)
    _done("train", run(p.train, p.descriptors, p.compute))


evaluate_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                           help="Validate the trained model: errors, reaction paths; `defects` for the transfer study.")
app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.callback(invoke_without_command=True)
def evaluate(ctx: typer.Context, params: Path = ParamsOpt):
    """Errors per split and config_type, parity plots, reaction paths to the extrapolation exit point."""
    if ctx.invoked_subcommand is not None:
        return
    from mlipops.evaluate.stage import run

    p = _params(params)
    from mlipops.models.schema import trusted_calculators

    _done("evaluate", run(p.evaluate, p.train.model_name, trusted_calculators(p)))


@evaluate_app.command("defects")
def evaluate_defects(
    params: Path = ParamsOpt,
    data: list[Path] = typer.Option(None, "--data", help="labelled extxyz file(s) instead of the curated data "
                                    "(e.g. a real DFT set; set evaluate.defects config_types for it)"),
    out: Path = typer.Option(DEFECTS_REPORTS, "--out", help="report directory"),
):
    """Train on perfect crystals only, test on defects: the error diagnosed (z vs bond angles, hull), a
    recommendation, and a control retraining with the recommended structures."""
    from mlipops.evaluate.defects import run

    _done("evaluate defects", run(_params(params), data or None, out))


@evaluate_app.command("melting")
def evaluate_melting(
    params: Path = ParamsOpt,
    reference: bool = typer.Option(False, "--reference", help="run the reference oracle instead (its Tm, latent "
                                   "heat and phase snapshots in data/melting/; the `melting_reference` stage)"),
):
    """Melting point by solid-liquid coexistence for every ensemble member, against the reference oracle's:
    Tm per member, ensemble mean ± std, P(|Tm - Tm_ref| <= window), the energy cause and the liquid coverage."""
    from mlipops.evaluate import melting_reference, melting_stage

    p = _params(params)
    if reference:
        _done("evaluate melting --reference", melting_reference.run(p))
    else:
        _done("evaluate melting", melting_stage.run(p))


@evaluate_app.command("melting-sweep")
def evaluate_melting_sweep(
    params: Path = ParamsOpt,
    fraction: list[float] = typer.Option(None, "--fraction", help="fractions to run (default "
                                         "evaluate.melting.sweep.fractions)"),
    no_run: bool = typer.Option(False, "--no-run", help="only collect the experiments already run"),
):
    """Tm against liquid coverage: one `dvc exp run` per fraction of liquid training frames kept
    (ingest.split.keep_in_train), then the table and plot in reports/evaluate/melting_sweep/."""
    from mlipops.evaluate import melting_stage

    out = melting_stage.run_sweep(_params(params), fraction or None, run_experiments=not no_run)
    _done("evaluate melting-sweep", {f"fraction_{q['fraction']:g}.tm_mean": q.get("tm_mean") for q in out["points"]}
          | {"wall_s": out["wall_s"]})


@evaluate_app.command("melting-bracket")
def evaluate_melting_bracket(
    params: Path = ParamsOpt,
    out: Path = typer.Option(MELTING_BRACKET_REPORTS, "--out", help="report directory"),
):
    """The reference oracle's Tm by a second method (on demand, not in `dvc repro`): NPT coexistence at fixed
    temperatures (evaluate.melting.bracket), the solid grows below Tm and melts above; the bracket, Tm from the
    growth rates, and the coexistence method's Tm beside it (bracket.json, summary.md, bracket.png)."""
    from mlipops.evaluate import melting_bracket

    _done("evaluate melting-bracket", melting_bracket.run(_params(params), out))


@evaluate_app.command("nve")
def evaluate_nve(params: Path = ParamsOpt):
    """Energy conservation: drift of E_tot in a short NVE run of the trained model (and of the reference)."""
    from mlipops.evaluate.nve import run
    from mlipops.models.schema import trusted_calculators

    p = _params(params)
    _done("evaluate nve", run(p.evaluate.nve, p.crystal, p.generate.oracle, p.train.model_name,
                              trusted_calculators(p)))


STRICT_EXIT = 3  # `mlipops promote --strict` on a rejected model (2: a user error, 1: an internal one)


@app.command()
def promote(params: Path = ParamsOpt, strict: bool = typer.Option(
        False, "--strict", help=f"exit {STRICT_EXIT} when the model is rejected (after writing every output); for CI")):
    """Check the gates; register a passing model (MLflow registry + registry/). A rejected model is a result:
    every output is written (reports/promote/decision.md says why) and the exit status is 0, unless --strict."""
    from mlipops.models.schema import trusted_calculators
    from mlipops.promote.registry import run

    p = _params(params)
    metrics = run(p.promote, p.train.model_name, trusted_calculators(p))
    _done("promote", metrics)
    if strict and not metrics["promoted"]:
        typer.echo(f"mlipops: promotion rejected ({metrics['n_gates_failed']} gate(s) failed, --strict): "
                   "see reports/promote/decision.md", err=True)
        sys.exit(STRICT_EXIT)


def _print_frame(df, csv: bool, as_json: bool, limit: int) -> None:
    """A DataFrame as a table (rich), CSV or JSON records (inf/NaN as null) on stdout."""
    if csv:
        df.to_csv(sys.stdout, index=False)
        return
    if as_json:
        import json

        import numpy as np

        import pandas as pd

        def clean(v):
            if v is pd.NA or v is pd.NaT:
                return None
            if isinstance(v, (np.floating, float)):
                return float(v) if np.isfinite(v) else None
            if isinstance(v, np.integer):
                return int(v)
            if isinstance(v, np.bool_):
                return bool(v)
            if isinstance(v, np.ndarray):
                return [clean(x) for x in v.tolist()]
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v if v is None or isinstance(v, (str, int, bool)) else str(v)

        rows = [{c: clean(v) for c, v in zip(df.columns, row)} for row in df.itertuples(index=False)]
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for c in df.columns:
        table.add_column(str(c))
    for row in df.head(limit).itertuples(index=False):
        table.add_row(*[f"{v:.6g}" if isinstance(v, float) else "" if v is None or v is pd.NA else str(v)
                        for v in row])
    console = Console(width=max(120, Console().width))
    console.print(table)
    if len(df) > limit:
        console.print(f"... {len(df) - limit} more rows (use --limit, --csv or --json)")


DbOpt = typer.Option(INDEX, "--db", help="index file")
CsvOpt = typer.Option(False, "--csv", help="print CSV instead of a table")
JsonOpt = typer.Option(False, "--json", help="print JSON records instead of a table")
LimitOpt = typer.Option(200, "--limit", help="rows shown in the table (CSV/JSON print all)")


active_app = typer.Typer(no_args_is_help=True, help="Active learning: committee MD, trigger, oracle calls (Dask).")
app.add_typer(active_app, name="active")


@active_app.command("run")
def active_run(params: Path = ParamsOpt,
               model: str = typer.Option(None, "--model", help="model directory or NAME@alias (default: "
                                         "active.model, else data/models/<train.model_name>)")):
    """Committee MD from the structures in params (section active), trigger on the velocity-projected
    uncertainty (or σ_F, or γ), label a de-duplicated batch with the oracle (generate.oracle) through
    Dask; writes data/raw/active/active_<iteration>.extxyz, curates it (ingest, validate, index), retrains
    the committee warm-started and scores it on a fixed held-out trajectory; reports in reports/active/.
    Interrupted, it resumes from data/active/state.json."""
    from mlipops.active.loop import active_crystal, run
    from mlipops.models.calculator import resolve_model
    from mlipops.oracles import get_oracle

    p = _params(params)
    a = p.active
    ref = model or a.model or str(MODELS_DIR / p.train.model_name)
    model_dir = resolve_model(ref, p.promote.registry_dir)
    oracle = get_oracle(p.generate.oracle.calculator, p.generate.oracle.kwargs)
    from mlipops.report import progress as campaign_progress

    fired = [0]
    per_run = len(a.md.temperatures_K) * a.md.steps_per_temperature
    per_iteration = len(a.structures) * per_run
    # the whole campaign in MD steps: its label/curate/train phases are in the elapsed time, so the estimate
    # of the time left covers them (the retraining also reports its own member-epochs)
    with campaign_progress("active campaign (MD steps)", a.iterations * per_iteration) as advance:

        def progress(st, stats, fires):
            fired[0] += bool(fires)
            advance(completed=st.iteration * per_iteration + st.md_run * per_run + st.md_step,
                    note=f"iteration {st.iteration} MD: σ_proj {stats['sigma_projected']:.3g} eV, "
                         f"max σ_F {stats['max_sigma_f']:.3g} eV/Å, {fired[0]} triggers")

        summary = run(p, oracle, model_dir, active_crystal(p), progress=progress)
    from mlipops.active.report import write_report

    write_report(summary, p)
    last = summary["history"][-1] if summary["history"] else {}
    keep = {"oracle_calls_total": "oracle_calls", "labelled": "labelled", "failed": "failed",
            "curate.n_quarantined_new": "quarantined", "holdout.force_mae": "holdout_force_mae_eVA", "model": "model"}
    _done("active run", {"iterations": summary["iterations"], "triggers": last.get("triggers")}
          | {v: (round(last[k], 5) if isinstance(last[k], float) else last[k]) for k, v in keep.items() if k in last})


@active_app.command("graduate")
def active_graduate(params: Path = ParamsOpt,
                    iteration: int = typer.Option(None, "--iteration", help="graduate iterations 0..N (default: "
                                                  "the last labelled one)"),
                    name: str = typer.Option(None, "--name", help="the source's file name under data/raw/ "
                                             "(default: active_<campaign id>)")):
    """Turn the campaign's labelled frames (iterations 0..N) into a DVC-tracked source of the pipeline's
    dataset: data/raw/<name>.extxyz and its provenance manifest (with the campaign's record), `dvc add`ed,
    added to ingest.sources (split train) in params.yaml and to the ingest stage's deps in dvc.yaml. The next
    `dvc repro` re-curates, re-indexes and retrains on them; a promoted version's card names the campaign."""
    from rich.console import Console

    from mlipops.active.graduate import graduate

    g = graduate(params, iteration, name)
    c, out = g.campaign, Console(stderr=True, soft_wrap=True)  # paths unbroken
    out.print(f"[bold green]active graduate[/] campaign {c['id']} (iterations {c['iterations']}): {c['n_frames']} "
              f"frames -> {g.data}" + ("" if g.changed else " (unchanged: graduated before)"))
    out.print(f"  provenance: {g.manifest}; DVC-tracked: {', '.join(g.dvc_files)}")
    out.print(f"  {params}: ingest.sources " + ("+= " if g.params_added else "already has ")
              + f"{{path: {g.data.as_posix()}, split: train}}")
    out.print("  dvc.yaml: ingest deps " + (f"+= {', '.join(g.deps_added)}" if g.deps_added else "already listed"))
    out.print(f"next: git add {params} dvc.yaml {' '.join(g.dvc_files)} {g.data.parent.as_posix()}/.gitignore"
              " && dvc repro   (re-curates, re-indexes, retrains; promote gates the new version)")


registry_app = typer.Typer(no_args_is_help=True,
                           help="The model registry (registry/index.json, MLflow Model Registry).")
app.add_typer(registry_app, name="registry")
RegistryOpt = typer.Option(None, "--registry", help="registry folder (default: promote.registry_dir of params.yaml)")


def _registry_dir(registry: Path | None, params: Path) -> Path:
    if registry is not None:
        return registry
    return Path(_params(params).promote.registry_dir) if params.is_file() else Path("registry")


@registry_app.command("list")
def registry_list(registry: Path = RegistryOpt, params: Path = ParamsOpt, csv: bool = CsvOpt, as_json: bool = JsonOpt):
    """Every registered version with its aliases, data version and gates."""
    from mlipops.promote.catalog import versions_table

    _print_frame(versions_table(_registry_dir(registry, params)), csv, as_json, 10_000)


@registry_app.command("show")
def registry_show(ref: str = typer.Argument(..., help="NAME@alias, NAME@vN or NAME (= NAME@champion)"),
                  registry: Path = RegistryOpt, params: Path = ParamsOpt):
    """A version's model card (gates, coverage, validation reports) and its files."""
    from mlipops.promote.catalog import show

    typer.echo(show(ref, _registry_dir(registry, params)))


@registry_app.command("load")
def registry_load(ref: str = typer.Argument(..., help="NAME@alias, NAME@vN or NAME (= NAME@champion)"),
                  structure: Path = typer.Option(None, "--structure", "-s",
                                                 help="structures to evaluate (extxyz, ASE db, mlearn json)"),
                  registry: Path = RegistryOpt, params: Path = ParamsOpt, csv: bool = CsvOpt, as_json: bool = JsonOpt):
    """Load a registered model (weights_only torch.load + JSON config: no code is executed; a Δ-learning
    baseline only among the built-ins or the one params.yaml names) and, with --structure, print its
    energy, σ and largest force per frame."""
    from mlipops.models.schema import trusted_calculators
    from mlipops.promote.catalog import load

    trusted = trusted_calculators(_params(params)) if params.is_file() else {}
    summary, df = load(ref, _registry_dir(registry, params), structure, trusted)
    typer.echo(summary, err=df is not None)
    if df is not None:
        _print_frame(df, csv, as_json, 10_000)


@app.command()
def report(model: str = typer.Option(None, "--model", help="registered model (default: train.model_name of params)"),
           version: int = typer.Option(None, "--version", min=1, help="version (default: champion, else the latest)"),
           registry: Path = typer.Option(None, "--registry-dir", "--registry",
                                         help="registry folder (default: promote.registry_dir of params.yaml)"),
           params: Path = ParamsOpt):
    """(Re)write a registered version's report.html (one self-contained page: model card, gates, plots, coverage
    tables, provenance) in its registry folder; print its path. `promote` writes it for every new version."""
    from mlipops.promote.html_report import version_folder, write_report

    p = _params(params) if params.is_file() and (model is None or registry is None) else None
    name = model or (p.train.model_name if p is not None else None)
    if name is None:
        raise MlipopsError(f"no --model given and no {params} to take train.model_name from", field="--model")
    registry_dir = registry or (Path(p.promote.registry_dir) if p is not None else Path("registry"))
    typer.echo(str(write_report(version_folder(registry_dir, name, version))))


@app.command()
def query(sql: str = typer.Argument(None, help="one SQL statement (read-only)"),
          file: Path = typer.Option(None, "--file", "-f", help="read the SQL from this file"),
          db: Path = DbOpt, csv: bool = CsvOpt, as_json: bool = JsonOpt,
          limit: int = typer.Option(200, "--limit", help="rows fetched and printed (table, CSV or JSON)"),
          timeout: float = typer.Option(60.0, "--timeout", help="seconds before the query is interrupted"),
          memory_limit: str = typer.Option("1GB", "--memory-limit", help="DuckDB memory limit (nothing spills "
                                                                         "to disk)")):
    """Read-only SQL on the coverage index, e.g. mlipops query "SELECT * FROM coverage_by_config".
    One SELECT statement; bounded in time, memory and rows; settings cannot be changed from SQL."""
    from mlipops.index.build import query as run_query

    if (sql is None) == (file is None):
        raise MlipopsError("give either an SQL statement or --file, not both", field="sql")
    if file is not None:  # a regular file of at most 1 MB of UTF-8 text (not /dev/zero, not a binary)
        if not file.is_file():
            raise MlipopsError("the query file is not a regular file" if file.exists() else "no such file",
                               file=str(file))
        try:
            with open(file, "rb") as fh:
                raw = fh.read(2**20 + 1)
            if len(raw) > 2**20:
                raise MlipopsError("the query file is larger than 1 MB", file=str(file))
            sql = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise MlipopsError(f"cannot read the query: {why}", file=str(file)) from None
    df = run_query(sql, db, limit=limit, timeout_s=timeout, memory_limit=memory_limit)
    _print_frame(df, csv, as_json, limit)
    if df.attrs.get("truncated"):
        typer.echo(f"showing {len(df)} of more than {len(df)} rows (raise --limit to see more)", err=True)


@app.command()
def check(files: list[Path] = typer.Argument(..., help="structure files (extxyz, ASE db, mlearn json)"),
          params: Path = ParamsOpt, csv: bool = CsvOpt, as_json: bool = JsonOpt, limit: int = LimitOpt):
    """What ingest + validate would decide for each frame (its split, the suite, the outlier test next to the
    current training data); writes nothing."""
    from mlipops.quality.check import check_files

    p = _params(params)
    df = check_files(files, p.validate_, p.descriptors, p.ingest)
    _print_frame(df, csv, as_json, limit)
    counts = df["verdict"].value_counts()
    typer.echo(f"{len(df)} frames: " + ", ".join(f"{n} {v}" for v, n in counts.items()), err=True)


quarantine_app = typer.Typer(no_args_is_help=True, help="The quarantine of the validate stage.")
app.add_typer(quarantine_app, name="quarantine")


@quarantine_app.command("release")
def quarantine_release(frame_id: str = typer.Argument(..., help="frame_id (or a unique prefix) of a quarantined frame"),
                       why: str = typer.Option(..., "--why", help="why the frame is released (recorded)")):
    """Release a quarantined frame: recorded in data/quarantine_releases.yaml, applied by the next dvc repro."""
    from mlipops.pipeline import QUARANTINE, RELEASES
    from mlipops.quality.releases import release

    e = release(frame_id, why, QUARANTINE)
    typer.echo(f"released {e['frame_id'][:12]} ({e['source']} #{e['source_index']}, checks {','.join(e['checks'])}) "
               f"into {RELEASES}; run `dvc repro` to apply it")


@quarantine_app.command("list")
def quarantine_list(csv: bool = CsvOpt, as_json: bool = JsonOpt, limit: int = LimitOpt):
    """The quarantined frames with their checks and reasons."""
    import pandas as pd

    from mlipops.pipeline import QUARANTINE

    if not QUARANTINE.is_file():
        raise MlipopsError("no quarantine: run `dvc repro validate` first", file=str(QUARANTINE))
    q = pd.read_parquet(QUARANTINE)
    q["frame_id"] = q["frame_id"].str.slice(0, 12)
    _print_frame(q[["frame_id", "stage", "source", "source_index", "config_type", "check", "reason"]],
                 csv, as_json, limit)


hull_app = typer.Typer(no_args_is_help=True, help="The descriptor-space convex hull of the training data.")
app.add_typer(hull_app, name="hull")


@hull_app.command("check")
def hull_check(structure: Path = typer.Argument(..., help="structures to check (extxyz, ASE db, mlearn json)"),
               db: Path = DbOpt, csv: bool = CsvOpt, as_json: bool = JsonOpt, limit: int = LimitOpt):
    """Extrapolation grade γ of every atom of new structures against the training hull."""
    from mlipops.frames import read_frames
    from mlipops.index.build import check_structures
    from mlipops.index.hull import check_cells

    frames, bad = read_frames(structure)  # a missing, non-regular or non-structure file: one line
    for r in bad:
        typer.echo(f"mlipops: skipped frame {r.source_index} of {structure}: {r.reason}", err=True)
    if not frames:
        raise MlipopsError("no readable frame", file=str(structure))
    check_cells(frames, str(structure))
    df = check_structures(frames, db)
    _print_frame(df, csv, as_json, limit)
    n_out = int((~df.inside_hull).sum())
    typer.echo(f"{n_out} of {len(df)} atoms outside the training hull; max γ = "
               f"{df.extrapolation_grade.max():.4g}", err=True)


gates_app = typer.Typer(no_args_is_help=True, help="Promotion gates generated from the data (`gates init`).")
app.add_typer(gates_app, name="gates")


@gates_app.command("init")
def gates_init(params: Path = ParamsOpt,
               data: Path = typer.Option(ACCEPTED, help="the curated frames (with split)"),
               write: bool = typer.Option(False, "--write", help="replace promote.gates in the params file (every "
                                          "other line kept; where that block cannot be edited: gates.yaml to paste)")):
    """A gate set from the data's own config_types and splits: force bounds from each config_type's force
    scale, energy bounds per atom, melting/nve/path gates only where they apply (else not_applicable with the
    reason). Prints the YAML fragment; --write puts it in place of promote.gates."""
    from mlipops.promote.gateset import data_stats, fragment, generate, write_into_params

    p = _params(params)
    text = generate(p, data_stats(data))
    if not write:
        typer.echo(fragment(text), nl=False)
        return
    out = write_into_params(params, text)
    typer.echo(f"mlipops: gates written to {out}" + ("" if out == params else " (paste them into " + str(params) + ")"),
               err=True)


@app.command()
def ui(port: int = typer.Option(5000, help="port on 127.0.0.1"),
       workers: int = typer.Option(1, min=1, help="server processes (MLflow's default is 4; one user needs one)"),
       params: Path = ParamsOpt):
    """Start the MLflow UI on 127.0.0.1 over the project's tracking store; with a tracking server
    (MLFLOW_TRACKING_URI or train.tracking_uri http(s)://), print that server's runs page instead."""
    from mlipops.tracking import is_server, relocate, tracking_uri

    p = _params(params).train
    if is_server(tracking_uri(p.tracking_uri)):
        _team_server_ui(p, params)
        return
    relocate(p.tracking_uri)  # a copied or moved project: its own store's artifact locations
    art = p.artifact_location
    art_uri = art if "://" in art else Path(art).resolve().as_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(p.tracking_uri),
           "--default-artifact-root", art_uri, "--host", "127.0.0.1", "--port", str(port), "--app-name", "mlipops",
           "--workers", str(workers)]
    typer.echo(f"MLflow UI on http://127.0.0.1:{port}  ({' '.join(cmd[3:])})")
    exp_id = _experiment_id(p)
    typer.echo("the training runs, headline metrics as columns: " + (
        f"http://127.0.0.1:{port}/mlipops/runs/{exp_id}" if exp_id else f"http://127.0.0.1:{port}/#/experiments"))
    os.execv(sys.executable, cmd)


def _experiment_id(p) -> str | None:
    """The id of the experiment ``train.experiment`` in the tracking store (None: none yet), tagged as a
    model-training experiment (MLflow's runs view, see :mod:`mlipops.tracking`)."""
    from mlipops.tracking import KIND, KIND_TAG, client

    c = client(p.tracking_uri)
    exp = c.get_experiment_by_name(p.experiment)
    if exp is None:
        return None
    if KIND_TAG not in exp.tags:  # a store from before the tag
        c.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def _team_server_ui(p, params: Path) -> None:
    """A team's tracking server already serves MLflow's UI: print its runs page, start nothing."""
    from mlflow.exceptions import MlflowException

    from mlipops.tracking import tracking_uri, without_credentials

    uri = without_credentials(tracking_uri(p.tracking_uri))
    env = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    # a server that does not answer: an error in seconds, not after MLflow's default 7 retries of 120 s each
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        exp_id = _experiment_id(p)
    except MlflowException as exc:
        raise StageInputError(f"the MLflow tracking server {uri} did not answer: {str(exc).splitlines()[0][:300]}",
                              file=None if env else str(params),
                              field="MLFLOW_TRACKING_URI" if env else "train.tracking_uri") from None
    base = uri.rstrip("/")
    typer.echo(f"MLflow tracking server {uri} (from {'MLFLOW_TRACKING_URI' if env else 'train.tracking_uri'}): "
               "it serves the UI, no local `mlflow ui` is started")
    if exp_id is None:
        typer.echo(f"no experiment {p.experiment!r} there yet (train a model first): {base}/#/experiments")
        return
    typer.echo(f"the training runs: {base}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    typer.echo(f"the same with the headline metrics as columns: {base}/mlipops/runs/{exp_id} (only when that server "
               "runs with `--app-name mlipops`, mlipops installed in its environment)")


example_app = typer.Typer(no_args_is_help=True, help="Shipped examples on real data (examples/<name>/).")
app.add_typer(example_app, name="example")


@example_app.command("sync")
def example_sync(check: bool = typer.Option(False, "--check", help="only report stale files (exit 1)"),
                 root: Path = typer.Option(Path("."),
                                           help="the project root (holds params.yaml, dvc.yaml, examples/)")):
    """Write each example's params.yaml and dvc.yaml from its example.yaml and the project's files."""
    from mlipops import examples

    found = examples.examples(root)
    if not found:
        raise StageInputError(f"no examples/*/example.yaml under {root.resolve()}")
    stale = [f for folder in found for f in examples.sync(root, folder, check=check)]
    for f in stale:
        typer.echo(f"{'stale' if check else 'wrote'} {f}")
    if check and stale:
        typer.echo("run `mlipops example sync` and commit the result", err=True)
        raise typer.Exit(1)


def main() -> None:
    """Entry point: user errors print one line and exit 2; no tracebacks unless MLIPOPS_DEBUG=1."""
    from mlipops.log import setup

    setup()
    try:
        app(standalone_mode=False)
    except MlipopsError as exc:
        typer.echo(f"mlipops: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("mlipops: interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors come here too
        # click's, or those of the click Typer >= 0.2x vendors (typer._click: not click's classes)
        names = {c.__name__ for c in type(exc).__mro__}
        if "ClickException" in names:
            exc.show()
            sys.exit(2)
        if "Abort" in names:
            sys.exit(1)
        if os.environ.get("MLIPOPS_DEBUG"):
            traceback.print_exc()
        typer.echo(f"mlipops: internal error: {type(exc).__name__}: {exc} (set MLIPOPS_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
