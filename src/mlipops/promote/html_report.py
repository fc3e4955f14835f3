"""One self-contained HTML page per registered version: ``registry/<model>/v<N>/report.html``.

The page shows what the version folder holds, nothing else: its provenance (``run.json``, the registry's
``index.json`` entry, the weights' sha256), the gates (``gates.json``: value, bound, result, failures
highlighted), the model card (``model_card.md`` rendered), the coverage tables promotion copied from the index
(``coverage.json``), every plot of the folder with its caption, grouped by report with the report's
``summary.md``, and links to the folder's files. Self-contained: CSS inline, images as ``data:`` URIs, no script,
no external resource (a Content-Security-Policy forbids loading any); links to the folder's files are relative, so
they work where the page lies. Everything that comes from the folder is escaped (markdown is rendered with raw
HTML off). Deterministic: the same folder gives the same bytes, so rewriting it (``mlipops report``) changes
nothing unless the folder or the index did.
"""

from __future__ import annotations

import base64
import json
import math
import os
from html import escape
from pathlib import Path
from urllib.parse import quote, unquote

from mlipops.errors import MlipopsError
from mlipops.paths import atomic_write_text, read_registry_index, registry_version
from mlipops.provenance import model_fingerprint

FILE = "report.html"
COVERAGE = "coverage.json"  # written by promotion: the coverage tables of the index the model was promoted with
MAX_TEXT_BYTES = 1_000_000  # a markdown file larger than this is not rendered
MAX_IMAGE_BYTES = 20_000_000  # an image larger than this is linked, not embedded
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml"}
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:0 1.5em 3em;
color:#1d2330}
header{border-bottom:2px solid #d0d7e2;margin-bottom:1em}h1{margin:.6em 0 .2em}
nav a{margin-right:1em}code{background:#f1f3f7;padding:0 .25em;border-radius:3px;font-size:90%}
pre{background:#f1f3f7;padding:.6em;overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #d0d7e2;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#eef1f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-weight:600;font-size:110%}.ok{color:#11682f}.bad{color:#a3111b}
tr.pass td.result{background:#e3f5e8;color:#11682f;font-weight:600}
tr.fail td{background:#fde4e6}tr.fail td.result{color:#a3111b;font-weight:700}
tr.na td{color:#5d6677;background:#f6f7f9}
.card{border:1px solid #d0d7e2;border-radius:6px;padding:0 1.2em;overflow-x:auto}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top;max-width:440px}
figure img,.card img,details img{max-width:100%;height:auto;border:1px solid #e2e6ee}
figcaption{font-size:13px;color:#3b4456}details{margin:.4em 0 1em}summary{cursor:pointer;color:#2b5fb4}
.note{color:#5d6677;font-style:italic}.scroll{overflow-x:auto}
"""


def _md():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _inside(path: Path, folder: Path) -> bool:
    """A regular file, itself no symlink, that resolves inside ``folder``."""
    try:
        return (not path.is_symlink() and path.is_file()
                and path.resolve().is_relative_to(folder.resolve()))
    except (OSError, RuntimeError):
        return False


def _data_uri(path: Path, folder: Path) -> str | None:
    mime = IMAGE_TYPES.get(path.suffix.lower())
    if mime is None or not _inside(path, folder) or path.stat().st_size > MAX_IMAGE_BYTES:
        return None
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _local(src: str, base: Path, folder: Path) -> Path | None:
    """The file a relative link of a markdown file in ``base`` names, inside the version folder; else None."""
    if not src or "://" in src or src.startswith(("/", "#", "data:", "mailto:")):
        return None
    path = Path(os.path.normpath(base / unquote(src.split("#")[0].split("?")[0])))
    return path if path.resolve().is_relative_to(folder.resolve()) else None


def _href(rel: str) -> str:
    """A relative link to a file of the folder, for an attribute."""
    return escape(quote(rel))


def _anchor(rel: str) -> str:
    return "fig-" + "".join(c if c.isalnum() else "-" for c in rel)


def _render_markdown(md, tokens, base: Path, folder: Path, figures: dict[str, str] | None = None) -> str:
    """Tokens of a markdown file in ``base`` as HTML: images of the folder embedded (or, when in ``figures``,
    a link to that figure of the page), relative links rewritten to stay right from the page's folder;
    images from elsewhere become their text."""
    from markdown_it.token import Token

    for block in tokens:
        children = []
        for tok in block.children or []:
            href = tok.attrGet("href") if tok.type == "link_open" else None
            if href is not None and (path := _local(str(href), base, folder)) is not None:
                frag = str(href)[len(str(href).split("#")[0]):]
                tok.attrSet("href", quote(path.relative_to(folder).as_posix()) + frag)
            if tok.type == "image":
                src, path = str(tok.attrGet("src") or ""), _local(str(tok.attrGet("src") or ""), base, folder)
                alt = md.renderer.renderInlineAsText(tok.children or [], md.options, {})
                rel = path.relative_to(folder).as_posix() if path is not None else None
                if figures is not None and rel in figures:
                    link = [Token("link_open", "a", 1, attrs={"href": f"#{figures[rel]}"}),
                            Token("text", "", 0, content=f"[figure: {alt or rel}]"), Token("link_close", "a", -1)]
                    children += link
                    continue
                if path is not None and (uri := _data_uri(path, folder)) is not None:
                    tok.attrSet("src", uri)
                else:
                    tok = Token("text", "", 0, content=f"[image not embedded: {alt} ({src})]")
            children.append(tok)
        if block.children is not None:
            block.children = children
    return md.renderer.render(tokens, md.options, {})


def _read_text(path: Path, folder: Path) -> str | None:
    if not _inside(path, folder) or path.stat().st_size > MAX_TEXT_BYTES:
        return None
    return path.read_text(errors="replace")


def _read_json(path: Path, folder: Path):
    text = _read_text(path, folder)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _table(columns: list, rows: list, row_class=None) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = []
    for r in rows:
        cls = f' class="{row_class(r)}"' if row_class else ""
        cells = "".join(f'<td class="num">{escape(_fmt(v))}</td>' if isinstance(v, (int, float)) and
                        not isinstance(v, bool) else f"<td>{escape(_fmt(v))}</td>" for v in r)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _gates(gates: list) -> tuple[str, str]:
    """The gates table (one row per gate of ``gates.json``, class pass/fail/na) and the verdict line."""
    rows, results = [], []
    for g in [g for g in gates if isinstance(g, dict)] if isinstance(gates, list) else []:
        na = g.get("not_applicable")
        result = "na" if na else "pass" if g.get("passed") else "fail"
        results.append(result)
        bound = "" if na else f"{'≥' if g.get('bound') == 'min' else '≤'} {_fmt(g.get('threshold'))}"
        rows.append(f'<tr class="{result}"><td>{escape(str(g.get("gate")))}</td>'
                    f'<td class="num">{escape(_fmt(g.get("value")))}</td><td class="num">{escape(bound)}</td>'
                    f'<td class="result">{"n/a" if na else result.upper() if result == "fail" else result}</td>'
                    f'<td>{escape(str(na or g.get("note") or ""))}</td></tr>')
    failed, n_na = results.count("fail"), results.count("na")
    verdict = (f'<p class="verdict {"bad" if failed or not rows else "ok"}" id="verdict">Gates: '
               f"{len(rows) - n_na - failed}/{len(rows) - n_na} passed" + (f", {failed} FAILED" if failed else "")
               + (f", {n_na} not applicable" if n_na else "") + "</p>")
    if not rows:
        return '<p class="note">no gates in this folder (gates.json)</p>', verdict
    return ('<table id="gates-table"><thead><tr><th>gate</th><th>value</th><th>bound</th><th>result</th>'
            f"<th>note</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"), verdict


def _provenance(folder: Path, name: str, version: int) -> str:
    run = _read_json(folder / "run.json", folder) or {}
    entry = {}
    try:
        for v in read_registry_index(folder.parent.parent)["models"].get(name, {}).get("versions", []):
            if isinstance(v, dict) and str(v.get("version")) == str(version):
                entry = v
    except (MlipopsError, AttributeError):
        pass
    cov = _read_json(folder / COVERAGE, folder) or {}
    weights = model_fingerprint(folder) if _inside(folder / "weights.pt", folder) else None
    rows = [("registered model", f"{name} v{version} (MLflow models:/{name}/{version})"),
            ("created", entry.get("created")), ("git commit", entry.get("git_commit")),
            ("MLflow run id", run.get("run_id")), ("MLflow experiment id", run.get("experiment_id")),
            ("tracking URI", run.get("tracking_uri")), ("data md5 (accepted.extxyz)", run.get("data_md5")),
            ("ensemble member runs", len(run.get("member_run_ids") or []) or None),
            ("weights sha256", weights), ("coverage index dataset", cov.get("dataset_id"))]
    body = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(_fmt(v))}</code></td></tr>" for k, v in rows
                   if v is not None)
    return f'<table id="provenance-table"><tbody>{body}</tbody></table>'


def _coverage(folder: Path, data_md5) -> str:
    cov = _read_json(folder / COVERAGE, folder)
    if not isinstance(cov, dict):
        return (f'<p class="note">No {COVERAGE} in this folder (promoted before it was kept): the model card\'s '
                "Data coverage and Known limits sections hold its coverage.</p>")
    if not cov.get("available", True):
        return f'<p class="note">{escape(str(cov.get("reason", "coverage index missing at promotion")))}</p>'
    out = []
    if data_md5 and cov.get("dataset_id") and cov["dataset_id"] != data_md5:
        out.append(f'<p class="bad">The index was built for data {escape(str(cov["dataset_id"]))}, the model '
                   f"trained on {escape(str(data_md5))}.</p>")
    for title, t in (cov.get("tables") or {}).items():
        if isinstance(t, dict) and "error" in t:
            out.append(f"<h3>{escape(str(title))}</h3>"
                       f'<p class="bad">not read from the index at promotion: {escape(str(t["error"]))}</p>')
        elif isinstance(t, dict):
            out.append(f"<h3>{escape(str(title))}</h3>" + _table(list(t.get("columns", [])), list(t.get("rows", [])))
                       + ('<p class="note">(first rows only)</p>' if t.get("truncated") else ""))
    return "".join(out)


def _files(folder: Path) -> list[Path]:
    """The folder's regular files (symlinks neither followed nor listed), sorted: top level first."""
    out = []
    for top, dirs, names in os.walk(folder):
        dirs.sort()
        out += [Path(top) / n for n in sorted(names) if _inside(Path(top) / n, folder) and n != FILE]
    return sorted(out, key=lambda p: (len(p.relative_to(folder).parts), p.relative_to(folder).as_posix()))


def _plots(md, folder: Path, files: list[Path]) -> str:
    """Every image of the folder once, grouped by folder, captioned by the alt text its report's summary.md
    gives it (else its file name); the summary below its figures, its images linking to them."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        if f.suffix.lower() in IMAGE_TYPES:
            groups.setdefault(f.parent.relative_to(folder).as_posix(), []).append(f)
    for f in files:
        if f.name == "summary.md":
            groups.setdefault(f.parent.relative_to(folder).as_posix(), [])
    out = []
    for sub, images in groups.items():
        base = folder / sub
        text = _read_text(base / "summary.md", folder)
        tokens = md.parse(text) if text is not None else []
        heads = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h1"]
        title = heads[0] if heads else sub if sub != "." else "Evaluation"
        captions: dict[str, str] = {}
        for tok in tokens:
            for c in tok.children or []:
                p = _local(str(c.attrGet("src") or ""), base, folder) if c.type == "image" else None
                if p is not None:
                    captions.setdefault(p.relative_to(folder).as_posix(),
                                        md.renderer.renderInlineAsText(c.children or [], md.options, {}))
        figs, anchors = [], {}
        for f in images:
            rel = f.relative_to(folder).as_posix()
            uri = _data_uri(f, folder)
            caption = captions.get(rel) or f.stem.replace("_", " ")
            anchors[rel] = _anchor(rel)
            img = f'<img src="{uri}" alt="{escape(caption)}">' if uri else "<p>(too large to embed)</p>"
            figs.append(f'<figure id="{anchors[rel]}">{img}<figcaption>{escape(caption)} '
                        f'(<a href="{_href(rel)}">{escape(rel)}</a>)</figcaption></figure>')
        summary = (f"<details><summary>{escape((base / 'summary.md').relative_to(folder).as_posix())}</summary>"
                   f"{_render_markdown(md, tokens, base, folder, anchors)}</details>" if text is not None else "")
        where = f"{sub}/" if sub != "." else "the version folder"
        out.append(f'<section class="group"><h3>{escape(title)} <small>({escape(where)})</small></h3>'
                   f"{''.join(figs)}{summary}</section>")
    return "".join(out) or '<p class="note">no plots in this folder</p>'


def render(folder: Path) -> str:
    """The page of the version folder ``<registry>/<name>/v<N>`` (see the module's docstring)."""
    folder = Path(os.path.abspath(folder))
    name, version = folder.parent.name, int(folder.name.removeprefix("v"))
    md = _md()
    gates_table, verdict = _gates(_read_json(folder / "gates.json", folder) or [])
    card_text = _read_text(folder / "model_card.md", folder)
    card = (_render_markdown(md, md.parse(card_text), folder, folder) if card_text is not None
            else '<p class="note">no readable model_card.md</p>')
    files = _files(folder)
    listing = "".join(f'<li><a href="{_href(f.relative_to(folder).as_posix())}">'
                      f"{escape(f.relative_to(folder).as_posix())}</a> ({f.stat().st_size:,} bytes)</li>"
                      for f in files)
    data_md5 = (_read_json(folder / "run.json", folder) or {}).get("data_md5")
    title = f"{name} v{version}: model report"
    sections = [("provenance", "Provenance", _provenance(folder, name, version)),
                ("gates", "Gates", gates_table), ("card", "Model card", f'<article class="card">{card}</article>'),
                ("coverage", "Data coverage (from the index at promotion)", _coverage(folder, data_md5)),
                ("plots", "Plots and validation reports", _plots(md, folder, files)),
                ("files", "Files", f"<ul>{listing}</ul>")]
    nav = "".join(f'<a href="#{sid}">{escape(head)}</a>' for sid, head, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{escape(head)}</h2>{html}</section>' for sid, head, html in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><header>"
            f'<h1 id="title">{escape(title)}</h1>{verdict}<nav>{nav}</nav></header>\n{body}\n</body></html>\n')


def write_report(folder: Path) -> Path:
    """Write ``report.html`` into the version folder (atomically); its path."""
    path = Path(folder) / FILE
    atomic_write_text(path, render(Path(folder)))
    return path


def version_folder(registry_dir: Path, name: str, version: int | None = None) -> Path:
    """The folder of ``name``'s ``version`` in the registry; by default the champion, else the latest version.
    A model or version the registry does not hold is a one-line :class:`MlipopsError`."""
    if version is None:
        entry = read_registry_index(registry_dir)["models"].get(name)
        if isinstance(entry, dict) and "champion" not in (entry.get("aliases") or {}):
            known = [int(v["version"]) for v in entry.get("versions", []) if isinstance(v, dict) and "version" in v]
            if not known:
                raise MlipopsError(f"model {name!r} has no version", file=str(Path(registry_dir) / "index.json"))
            version = max(known)
    return registry_version(f"{name}@v{version}" if version is not None else f"{name}@champion", registry_dir)
