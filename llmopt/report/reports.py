"""The suite runner: execute notebooks headless with papermill, convert them to HTML, rebuild the index.

Each notebook runs into a temporary directory; only a notebook that finished is converted and moved into
`reports/`, so a failed run never leaves a partial report behind.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..bench.environment import environment
from ..paths import REPO_ROOT
from ..errors import InvalidParameterError, LLMOptError

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
REPORTS_DIR = REPO_ROOT / "reports"


@dataclass
class NotebookRun:
    name: str
    ok: bool
    seconds: float
    html_path: Path | None = None
    error: str = ""
    slowest_cells: list[tuple[float, str]] = field(default_factory=list)  # (seconds, first source line), slowest first


def discover(names: list[str] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """Notebooks to run, in order: all `NN_*.ipynb`, or those whose name starts with one of `names`."""
    found = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return found
    chosen = [p for p in found if any(p.stem == n or p.stem.startswith(n) for n in names)]
    if not chosen:
        raise InvalidParameterError(f"no notebook matches {names}; have {[p.stem for p in found]}")
    return chosen


def _error_line(exc: Exception) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:  # papermill's PapermillExecutionError: the error raised inside the notebook
        return f"{ename}: {evalue}"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def run_notebook(path: Path, parameters: dict, reports_dir: Path = REPORTS_DIR,
                 timeout_s: int | None = None) -> NotebookRun:
    """Execute one notebook with `parameters`; on success write `reports/<name>.html`."""
    import time

    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmopt-run-") as tmp:
        executed = Path(tmp) / path.name
        try:
            papermill.execute_notebook(str(path), str(executed), parameters=parameters, cwd=str(path.parent),
                                       kernel_name="python3", progress_bar=False, execution_timeout=timeout_s,
                                       log_output=False)
        except Exception as exc:  # noqa: BLE001 - reported as one line, no report written
            return NotebookRun(path.stem, False, time.perf_counter() - start, error=_error_line(exc))
        notebook = nbformat.read(str(executed), as_version=4)
        slowest = cell_seconds(notebook)[:3]
        body, _ = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(notebook)
        reports_dir.mkdir(parents=True, exist_ok=True)
        staged = Path(tmp) / f"{path.stem}.html"
        staged.write_text(body)
        target = reports_dir / f"{path.stem}.html"
        shutil.move(str(staged), str(target))
    return NotebookRun(path.stem, True, time.perf_counter() - start, html_path=target, slowest_cells=slowest)


def cell_seconds(notebook) -> list[tuple[float, str]]:
    """(seconds, first non-blank source line) of every code cell papermill timed, slowest first."""
    timed = []
    for cell in notebook.cells:
        duration = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell.cell_type == "code" and duration is not None:
            first = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
            timed.append((float(duration), first[:60]))
    return sorted(timed, reverse=True)


def read_headlines(results_dir: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(Path(results_dir).glob("headline_*.json")):
        record = json.loads(f.read_text())
        out[record["notebook"]] = record
    return out


def _table_html(table: dict | None) -> str:
    if not table:
        return ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table["columns"])
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in table["data"])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return html.escape(str(value))


def _ran_on(h: dict) -> str:
    """Where a headline's notebook ran, from its recorded environment: the CPU and its threads, or the GPU."""
    threads = f"{h.get('cpu', '?')} ({h.get('torch_threads', '?')} threads)"
    if str(h.get("device", "cpu")).startswith("cuda"):
        return f"{h.get('device_name', '?')} (host {threads})"
    return threads


def _generated_at(headline: dict, report: Path) -> _dt.datetime:
    """When a notebook's results were measured: its headline's timestamp (a clone or a copy resets the report
    file's mtime), else the report file's mtime."""
    try:
        return _dt.datetime.fromisoformat(headline["timestamp_utc"]).astimezone(_dt.timezone.utc)
    except (KeyError, TypeError, ValueError):
        return _dt.datetime.fromtimestamp(report.stat().st_mtime, _dt.timezone.utc)


def build_index(reports_dir: Path = REPORTS_DIR, results_dir: Path | None = None) -> Path:
    """Write `reports/index.html`: one card per executed notebook with its key figure, and the environment."""
    from ..bench.harness import results_dir as default_results_dir

    results_dir = Path(results_dir) if results_dir else default_results_dir()
    headlines = read_headlines(results_dir)
    env = environment()
    cards = []
    for report in sorted(Path(reports_dir).glob("[0-9][0-9]_*.html")):
        name = report.stem
        h = headlines.get(name, {})
        generated = _generated_at(h, report)
        cards.append(
            f"<section class='card'><h2><a href='{html.escape(report.name)}'>{html.escape(h.get('title', name))}"
            f"</a></h2><p class='figure'>{html.escape(h.get('key_figure', ''))}</p>"
            f"<p class='verdict'>{html.escape(h.get('verdict', ''))}</p>{_table_html(h.get('table'))}"
            f"<p class='meta'>generated {generated:%Y-%m-%d %H:%M} UTC · git {html.escape(h.get('git_revision', '?'))}"
            f" · {html.escape(_ran_on(h))}</p></section>")
    env_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in env.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>llmopt reports</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
.card{{border:1px solid #ddd;border-radius:8px;padding:0.6em 1.2em;margin:1em 0}}
.figure{{font-size:1.15em;font-weight:600}} .verdict{{color:#444}} .meta{{color:#777;font-size:0.85em}}
table{{border-collapse:collapse;margin:0.5em 0}} td,th{{border:1px solid #ddd;padding:2px 8px;text-align:left}}</style>
</head><body><h1>llmopt — measured LLM inference optimizations</h1>
<p>Every figure below was measured by the linked notebook on the machine described at the bottom. The design
document's numbers appear in the reports only beside measured ones, labeled as estimates.</p>
{''.join(cards) or '<p>No reports yet: run <code>make report</code>.</p>'}
<h2>Environment of this index build</h2><table>{env_rows}</table></body></html>"""
    Path(reports_dir).mkdir(parents=True, exist_ok=True)
    target = Path(reports_dir) / "index.html"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(page)
    os.replace(tmp, target)
    return target


README = REPO_ROOT / "README.md"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


README_PLOT = "07_combined_waterfall.png"  # saved by 07_combined into the results directory


def headline_markdown(results_dir: Path) -> str:
    """The README's headline table: one row per notebook, from the key figures its last run saved."""
    headlines = read_headlines(results_dir)
    if not headlines:
        return "Not generated yet: run `make report`."
    lines = ["| notebook | measured key figure | check |", "|---|---|---|"]
    for name, h in sorted(headlines.items()):
        lines.append(f"| [{h['title']}](reports/{name}.html) | {h['key_figure']} | {h['verdict']} |")
    any_h = next(iter(headlines.values()))
    lines.append("")
    lines.append(f"Measured on {_ran_on(any_h)}, torch "
                 f"{any_h.get('torch', '?')}, transformers {any_h.get('transformers', '?')}, git "
                 f"{any_h.get('git_revision', '?')}, {any_h.get('timestamp_utc', '?')}. Generated by `make report`.")
    plot = Path(results_dir) / README_PLOT
    if plot.is_file():  # the combined notebook's waterfall, linked where the README can reach it
        try:
            target = plot.resolve().relative_to(README.parent.resolve())
        except ValueError:
            target = plot.resolve()
        lines += ["", f"![Cumulative speedup of the stacked optimizations, measured (07_combined)]({target.as_posix()})"]
    return "\n".join(lines)


def update_readme(results_dir: Path, readme: Path = README) -> None:
    """Replace the README's headline block (between the markers) with the latest measured table."""
    text = readme.read_text()
    if HEADLINE_START not in text or HEADLINE_END not in text:
        return
    head, rest = text.split(HEADLINE_START, 1)
    _, tail = rest.split(HEADLINE_END, 1)
    readme.write_text(f"{head}{HEADLINE_START}\n{headline_markdown(results_dir)}\n{HEADLINE_END}{tail}")


def run_suite(names: list[str] | None = None, parameters: dict | None = None, smoke: bool = False,
              reports_dir: Path = REPORTS_DIR, results_dir: Path | None = None,
              timeout_s: int | None = None) -> list[NotebookRun]:
    """Run notebooks (all by default) and rebuild the index. Smoke runs use tiny parameters."""
    parameters = dict(parameters or {})
    if smoke:
        parameters["smoke"] = True
    old = os.environ.get("LLMOPT_RESULTS_DIR")
    if results_dir is not None:
        os.environ["LLMOPT_RESULTS_DIR"] = str(results_dir)  # the kernels inherit it
    try:
        runs = [run_notebook(p, parameters, reports_dir, timeout_s) for p in discover(names)]
        build_index(reports_dir)
        if not smoke and Path(reports_dir) == REPORTS_DIR:  # the main job keeps the README's table current
            from ..bench.harness import results_dir as current_results_dir

            update_readme(current_results_dir())
    finally:
        if results_dir is not None:
            if old is None:
                os.environ.pop("LLMOPT_RESULTS_DIR", None)
            else:
                os.environ["LLMOPT_RESULTS_DIR"] = old
    return runs


__all__ = ["run_suite", "run_notebook", "build_index", "discover", "LLMOptError"]
