"""The ``mlipops`` command line: one command per pipeline stage (the ``dvc.yaml`` stage commands),
plus ``query`` (read-only SQL on the coverage index) and ``ui`` (the MLflow UI)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import typer

from mlipops.errors import MlipopsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mlipops: versioned MLIP data, coverage index, training, validation, registry.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (one section per stage)")


def _params(path: Path):
    from mlipops.params import load_params

    return load_params(path)


def _done(stage: str, metrics: dict) -> None:
    from rich.console import Console

    keys = [k for k in metrics if "." not in k][:8]
    Console(stderr=True).print(f"[bold green]{stage}[/] done: " + ", ".join(f"{k}={metrics[k]}" for k in keys))


@app.command()
def generate(params: Path = ParamsOpt):
    """Build the embedded default dataset (recipes in params.yaml), labelled by the oracle."""
    from mlipops.generate import run

    _done("generate", run(_params(params).generate))


@app.command()
def ingest(params: Path = ParamsOpt):
    """Read every source, canonicalize, de-duplicate (recorded), assign splits."""
    from mlipops.ingest import run

    _done("ingest", run(_params(params).ingest))


@app.command()
def validate(params: Path = ParamsOpt):
    """Run the great-expectations suite; quarantine failing frames with their reason."""
    from mlipops.quality import run

    _done("validate", run(_params(params).validate_))


@app.command()
def index(params: Path = ParamsOpt):
    """Build the DuckDB coverage index data/index.duckdb."""
    from mlipops.index import run

    _done("index", run(_params(params).index))


@app.command()
def train(params: Path = ParamsOpt):
    """Train the potential on the curated train split, tracked in MLflow."""
    from mlipops.train import run

    p = _params(params)
    _done("train", run(p.train, p.descriptors))


@app.command()
def evaluate(params: Path = ParamsOpt):
    """Errors per split and config_type, parity plots."""
    from mlipops.evaluate import run

    p = _params(params)
    _done("evaluate", run(p.evaluate, p.train.model_name))


@app.command()
def promote(params: Path = ParamsOpt):
    """Check the gates; register a passing model (MLflow registry + registry/)."""
    from mlipops.promote import run

    p = _params(params)
    _done("promote", run(p.promote, p.train.model_name))


@app.command()
def query(sql: str = typer.Argument(..., help="one SQL statement (read-only)"),
          db: Path = typer.Option(Path("data/index.duckdb"), "--db", help="index file"),
          csv: bool = typer.Option(False, "--csv", help="print CSV instead of a table"),
          limit: int = typer.Option(200, "--limit", help="rows shown in the table (CSV prints all)")):
    """Run read-only SQL on the coverage index, e.g. mlipops query "SELECT * FROM coverage"."""
    from mlipops.index import query as run_query

    df = run_query(sql, db)
    if csv:
        df.to_csv(sys.stdout, index=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for c in df.columns:
        table.add_column(str(c))
    for row in df.head(limit).itertuples(index=False):
        table.add_row(*[f"{v:.6g}" if isinstance(v, float) else str(v) for v in row])
    console = Console(width=max(120, Console().width))
    console.print(table)
    if len(df) > limit:
        console.print(f"... {len(df) - limit} more rows (use --limit or --csv)")


@app.command()
def ui(port: int = typer.Option(5000, help="port on 127.0.0.1"), params: Path = ParamsOpt):
    """Start the MLflow UI on 127.0.0.1 over the project's tracking store."""
    from mlipops.train.tracking import tracking_uri

    p = _params(params).train
    art = p.artifact_location
    art_uri = art if "://" in art else Path(art).resolve().as_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(p.tracking_uri),
           "--default-artifact-root", art_uri, "--host", "127.0.0.1", "--port", str(port)]
    typer.echo(f"MLflow UI on http://127.0.0.1:{port}  ({' '.join(cmd[3:])})")
    os.execv(sys.executable, cmd)


def main() -> None:
    """Entry point: user errors print one line and exit 2; no tracebacks unless MLIPOPS_DEBUG=1."""
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
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if os.environ.get("MLIPOPS_DEBUG"):
            traceback.print_exc()
        typer.echo(f"mlipops: internal error: {type(exc).__name__}: {exc} (set MLIPOPS_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
