"""The suite runner: execute notebooks headless with papermill into a run folder, then publish a complete run.

A run writes only into its own folder, `runs/<UTC timestamp>-<host>/`:

    00_baseline.ipynb, 00_baseline.html, ...   the executed notebooks and their reports (a notebook that failed
                                               leaves `<name>.failed.ipynb`, with its traceback, and nothing else)
    index.html                                 one card per report of this run
    results/                                   the run's tidy results (CSV, headline_*.json, figures)
    environment.json, parameters.json          where it ran; the parameters that differ from the notebooks' defaults
    summary.json                               every notebook's outcome and headline record

Each notebook runs in a staging folder (`.staging-<name>/`, holding a copy of the run's results so far: 07 reads
what 00-06 measured in the same run); only a notebook that finished moves its outputs into the run folder.

Publishing (copying the reports to `reports/`, the results to `data/results/` and the headline into the README)
happens only for a complete default run of every notebook (no parameters, no smoke) or when asked (`publish=True`,
`llmopt run --publish`); never from a smoke run.

The parameters are checked before anything is written (`parameters.py`); the git revision is read once, before
anything is written, and handed to the kernels through $LLMOPT_GIT_REVISION.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..bench.environment import environment, git_revision
from ..errors import InvalidParameterError
from ..paths import REPO_ROOT
from . import parameters as params
from .index import build_index, read_headlines
from .readme import README, update_readme

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
REPORTS_DIR = REPO_ROOT / "reports"
RUNS_DIR = REPO_ROOT / "runs"
REVISION_VARIABLE = "LLMOPT_GIT_REVISION"  # read by bench.environment.git_revision()
ENGINE_NAME = "llmopt"


@dataclass
class NotebookRun:
    name: str
    ok: bool
    seconds: float
    html_path: Path | None = None
    error: str = ""  # the failure in one line: the cell and the error raised in it
    failed_cell: str = ""  # the first line of the cell that failed
    slowest_cells: list[tuple[float, str]] = field(default_factory=list)  # (seconds, first source line), slowest first
    key_figure: str = ""
    parameters: dict = field(default_factory=dict)  # the values that differ from the notebook's defaults


@dataclass
class SuiteRun:
    """The outcome of `run_suite`: the run folder and one `NotebookRun` per notebook (iterable as them)."""
    run_dir: Path
    notebooks: list[NotebookRun]
    git_revision: str
    smoke: bool
    published: bool = False
    publish_note: str = ""  # why the run was (not) published
    seconds: float = 0.0

    def __iter__(self):
        return iter(self.notebooks)

    def __len__(self) -> int:
        return len(self.notebooks)

    def __getitem__(self, index):
        return self.notebooks[index]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.notebooks)


class Reporter:
    """What the runner says as it goes; this one says nothing (`ConsoleReporter` prints)."""

    def suite_started(self, run_dir: Path, names: list[str], total_cells: int, revision: str) -> None: ...

    def notebook_started(self, position: int, count: int, name: str, cells: int) -> None: ...

    def cell_started(self, name: str, cell: int, cells: int, done: int, total: int, first_line: str) -> None: ...

    def cell_done(self, name: str, cell: int, cells: int, done: int, total: int, first_line: str) -> None: ...

    def notebook_done(self, position: int, count: int, run: NotebookRun, done: int, total: int) -> None: ...


class ConsoleReporter(Reporter):
    """One line per notebook as it starts and as it finishes (time, key figure or the failing cell); on a
    terminal, a live line below them with the cells done across the suite and the cell running now."""

    def __init__(self, stream=None, live=None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self._live_width = 0

    def _print(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._live_width:
            self.stream.write("\r" + " " * self._live_width + "\r")
            self._live_width = 0

    def suite_started(self, run_dir, names, total_cells, revision):
        self._print(f"run folder {run_dir} (git {revision}): {len(names)} notebook{'s' * (len(names) != 1)}, "
                    f"{total_cells} code cells")

    def notebook_started(self, position, count, name, cells):
        self._print(f"[{position}/{count}] {name}: started ({cells} code cells)")

    def cell_started(self, name, cell, cells, done, total, first_line):
        if self.live:
            text = f"  suite {done}/{total} cells · {name} cell {cell}/{cells}: {first_line}"[:110]
            self._clear()
            self.stream.write(text)
            self.stream.flush()
            self._live_width = len(text)

    def notebook_done(self, position, count, run, done, total):
        if run.ok:
            figure = f": {run.key_figure}" if run.key_figure else ""
            self._print(f"[{position}/{count}] {run.name}: ok in {run.seconds:.1f} s{figure} "
                        f"(suite {done}/{total} cells)")
        else:
            self._print(f"[{position}/{count}] {run.name}: FAILED after {run.seconds:.1f} s: {run.error}")


def discover(names: list[str] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """Notebooks to run, in order: all `NN_*.ipynb`, or those whose name starts with one of `names`."""
    found = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return found
    chosen = [p for p in found if any(p.stem == n or p.stem.startswith(n) for n in names)]
    unmatched = [n for n in names if not any(p.stem == n or p.stem.startswith(n) for p in found)]
    if unmatched or not chosen:
        raise InvalidParameterError(f"no notebook matches {unmatched or names}; have {[p.stem for p in found]}")
    return chosen


def code_cells(path: Path) -> int:
    return sum(c.get("cell_type") == "code" for c in json.loads(Path(path).read_text())["cells"])


def cell_seconds(notebook) -> list[tuple[float, str]]:
    """(seconds, first non-blank source line) of every code cell papermill timed, slowest first."""
    timed = []
    for cell in notebook.cells:
        duration = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell.cell_type == "code" and duration is not None:
            timed.append((float(duration), first_line(cell.source)))
    return sorted(timed, reverse=True)


def first_line(source: str, width: int = 60) -> str:
    line = next((line.strip() for line in source.splitlines() if line.strip() and not line.strip().startswith("#")),
                "")
    return line if len(line) <= width else line[:width - 1] + "…"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(exc: Exception) -> tuple[str, str]:
    """(the failure in one line, the failing cell's first line) of an exception papermill raised."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:  # papermill's PapermillExecutionError: the error raised inside the notebook, and its cell
        cell = first_line(getattr(exc, "source", "") or "", 80)
        value = _ANSI.sub("", str(evalue)).strip().splitlines()
        message = f"{ename}: {value[0] if value else ''}".rstrip(": ")
        return f"cell [{getattr(exc, 'exec_count', '?')}] `{cell}` raised {message}", cell
    text = _ANSI.sub("", f"{type(exc).__name__}: {exc}").splitlines()
    return (text[0] if text else type(exc).__name__), ""


def _register_engine() -> None:
    """A papermill engine that tells the runner as each cell starts and completes."""
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            on_start, on_done = kwargs.pop("on_cell_start", None), kwargs.pop("on_cell_done", None)
            start, complete = nb_man.cell_start, nb_man.cell_complete

            def cell_start(cell, cell_index=None, **kw):
                start(cell, cell_index=cell_index, **kw)
                if on_start and cell.cell_type == "code":
                    on_start(cell)

            def cell_complete(cell, cell_index=None, **kw):
                complete(cell, cell_index=cell_index, **kw)
                if on_done and cell.cell_type == "code":
                    on_done(cell)

            nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(ENGINE_NAME, ProgressEngine)


def notebook_title(notebook, default: str) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return default


def to_html(notebook, title: str, env: dict | None = None) -> str:
    """The report page of an executed notebook: `llmopt.report.html`'s document, else nbconvert's page."""
    try:
        from .html import notebook_html
    except ImportError:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(notebook)
        return body
    return notebook_html(notebook, title, index_href="index.html", environment=env)


@dataclass
class _Counter:
    done: int = 0
    total: int = 0


def run_notebook(path: Path, parameters: dict, run_dir: Path, timeout_s: int | None = None,
                 reporter: Reporter | None = None, position: tuple[int, int] = (1, 1),
                 counter: _Counter | None = None, env: dict | None = None) -> NotebookRun:
    """Execute one notebook with `parameters` in a staging folder of `run_dir`; on success move the executed
    notebook, its report and its results into the run folder, on failure keep only `<name>.failed.ipynb`."""
    import nbformat
    import papermill

    reporter = reporter or Reporter()
    counter = counter or _Counter()
    name = path.stem
    run_dir, results = Path(run_dir), Path(run_dir) / "results"
    staging = run_dir / f".staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "results").mkdir(parents=True)
    for f in results.glob("*") if results.is_dir() else []:  # what the run measured so far (07 reads it)
        shutil.copy2(f, staging / "results" / f.name)
    before = {f.name: f.stat().st_mtime_ns for f in (staging / "results").iterdir()}
    cells = code_cells(path) + (1 if parameters else 0)  # papermill adds a cell with the parameters
    seen = {"cell": 0}

    def on_start(cell):
        seen["cell"] += 1
        reporter.cell_started(name, seen["cell"], cells, counter.done, counter.total, first_line(cell.source))

    def on_done(cell):
        counter.done += 1
        reporter.cell_done(name, seen["cell"], cells, counter.done, counter.total, first_line(cell.source))

    _register_engine()
    reporter.notebook_started(*position, name, cells)
    executed = staging / path.name
    old = os.environ.get("LLMOPT_RESULTS_DIR")
    os.environ["LLMOPT_RESULTS_DIR"] = str(staging / "results")  # the kernel inherits it
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(path), str(executed), parameters=parameters, cwd=str(path.parent),
                                   kernel_name="python3", progress_bar=False, execution_timeout=timeout_s,
                                   log_output=False, engine_name=ENGINE_NAME, on_cell_start=on_start,
                                   on_cell_done=on_done, store_widget_state=False,
                                   # the kernel's own start-up warnings (TCP on localhost) are not the notebook's
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except Exception as exc:  # noqa: BLE001 - reported as one line; only the failed notebook is kept
        error, cell = error_line(exc)
        if executed.is_file():
            os.replace(executed, run_dir / f"{name}.failed.ipynb")
        shutil.rmtree(staging, ignore_errors=True)
        counter.done += max(cells - seen["cell"], 0)  # the cells that will not run
        run = NotebookRun(name, False, time.perf_counter() - start, error=error, failed_cell=cell,
                          parameters=parameters)
        reporter.notebook_done(*position, run, counter.done, counter.total)
        return run
    finally:
        if old is None:
            os.environ.pop("LLMOPT_RESULTS_DIR", None)
        else:
            os.environ["LLMOPT_RESULTS_DIR"] = old
    html_path, tmp = run_dir / f"{name}.html", staging / f"{name}.html"
    try:
        notebook = nbformat.read(str(executed), as_version=4)
        headline = read_headlines(staging / "results").get(name, {})
        tmp.write_text(to_html(notebook, headline.get("title") or notebook_title(notebook, name), env))
    except Exception as exc:  # noqa: BLE001 - the notebook ran, its report did not: nothing of it is kept
        os.replace(executed, run_dir / f"{name}.failed.ipynb")
        shutil.rmtree(staging, ignore_errors=True)
        run = NotebookRun(name, False, time.perf_counter() - start, parameters=parameters,
                          error=f"its report could not be written: {error_line(exc)[0]}")
        reporter.notebook_done(*position, run, counter.done, counter.total)
        return run
    results.mkdir(exist_ok=True)
    for f in (staging / "results").iterdir():  # what this notebook wrote or rewrote
        if f.is_file() and before.get(f.name) != f.stat().st_mtime_ns:
            os.replace(f, results / f.name)
    os.replace(executed, run_dir / path.name)
    os.replace(tmp, html_path)
    shutil.rmtree(staging, ignore_errors=True)
    run = NotebookRun(name, True, time.perf_counter() - start, html_path=html_path,
                      slowest_cells=cell_seconds(notebook)[:3], key_figure=headline.get("key_figure", ""),
                      parameters=parameters)
    reporter.notebook_done(*position, run, counter.done, counter.total)
    return run


def new_run_dir(runs_dir: Path) -> Path:
    """`runs_dir/<UTC timestamp>-<host>/`, created (a suffix when two runs start in the same second)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", platform.node().split(".")[0]) or "host"
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = Path(runs_dir) / (f"{stamp}-{host}" + (f"-{n}" if n > 1 else ""))
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise InvalidParameterError(f"cannot create a run folder in {runs_dir}")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _copy_atomically(source: Path, target_dir: Path) -> None:
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target_dir / f".{source.name}.publishing"
    shutil.copy2(source, tmp)
    os.replace(tmp, target_dir / source.name)


def publish(run_dir: Path, reports_dir: Path = REPORTS_DIR, results_dir: Path | None = None,
            readme: Path | None = README) -> None:
    """Copy a run's reports to `reports_dir` and its results to `results_dir` (default: data/results/, or
    $LLMOPT_RESULTS_DIR where set, as in the tests), rebuild the published index and, with `readme`, the README's
    headline block."""
    from ..bench.harness import results_dir as default_results_dir

    run_dir, reports_dir = Path(run_dir), Path(reports_dir)
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    for f in sorted((run_dir / "results").glob("*")):
        if f.is_file():
            _copy_atomically(f, results_dir)
    for f in sorted(run_dir.glob("[0-9][0-9]_*.html")):
        _copy_atomically(f, reports_dir)
    build_index(reports_dir, results_dir)
    if readme is not None:
        update_readme(results_dir, readme)


def run_suite(names: list[str] | None = None, parameters: dict | None = None, smoke: bool = False, *,
              runs_dir: Path = RUNS_DIR, publish_to: bool | None = None, reports_dir: Path = REPORTS_DIR,
              results_dir: Path | None = None, readme: Path | None = None, timeout_s: int | None = None,
              reporter: Reporter | None = None, notebooks_dir: Path = NOTEBOOKS_DIR) -> SuiteRun:
    """Run notebooks (all by default) into a new run folder under `runs_dir`; returns the `SuiteRun`.

    parameters: values for the notebooks' parameters (each notebook gets those it declares), checked first:
    an unknown name or a value out of range raises InvalidParameterError before anything is written.
    smoke: the tiny settings of `parameters.SMOKE`, under `parameters` (the user's values win).
    publish_to: None publishes a complete default run (every notebook, no parameters, not smoke, all succeeded);
    True publishes what succeeded (refused for a smoke run); False never. Publishing writes `reports_dir`,
    `results_dir` (default data/results/) and `readme`'s headline block (default: README.md when `reports_dir` is
    reports/, else none)."""
    parameters = dict(parameters or {})
    paths = discover(names, notebooks_dir)
    notebooks = [p.stem for p in paths]
    if smoke and publish_to:
        raise InvalidParameterError("a smoke run is never published: its numbers are meaningless")
    params.check(parameters, notebooks)
    resolved = {nb: params.resolve(nb, parameters, smoke, notebooks_dir) for nb in notebooks}
    # nothing is written above this line
    revision = os.environ.get(REVISION_VARIABLE) or git_revision()
    reporter = reporter or Reporter()
    started = _dt.datetime.now(_dt.timezone.utc)
    run_dir = new_run_dir(runs_dir)
    old_revision = os.environ.get(REVISION_VARIABLE)
    os.environ[REVISION_VARIABLE] = revision
    start = time.perf_counter()
    try:
        device = str(parameters.get("device", "cpu"))
        env = environment(device)
        _write_json(run_dir / "environment.json", env)
        _write_json(run_dir / "parameters.json", {nb: values for nb, values in resolved.items() if values})
        counter = _Counter(total=sum(code_cells(p) + (1 if resolved[p.stem] else 0) for p in paths))
        reporter.suite_started(run_dir, notebooks, counter.total, revision)
        runs = [run_notebook(p, resolved[p.stem], run_dir, timeout_s, reporter, (i, len(paths)), counter, env)
                for i, p in enumerate(paths, 1)]
        build_index(run_dir, run_dir / "results", env)
        suite = SuiteRun(run_dir, runs, revision, smoke, seconds=time.perf_counter() - start)
        complete_default = names is None or set(notebooks) == {p.stem for p in discover(None, notebooks_dir)}
        complete_default = complete_default and not parameters and not smoke
        if publish_to is False:
            suite.publish_note = "not published (asked not to)"
        elif not suite.ok:
            failed = [r.name for r in runs if not r.ok]
            if publish_to:
                suite.published = any(r.ok for r in runs)
                suite.publish_note = (f"published the notebooks that finished; not {', '.join(failed)}"
                                      if suite.published else "not published: every notebook failed")
            else:
                suite.publish_note = f"not published: {', '.join(failed)} failed"
        elif publish_to or complete_default:
            suite.published = True
            suite.publish_note = "published (--publish)" if publish_to and not complete_default else \
                "published: a complete default run"
        else:
            suite.publish_note = ("not published: a smoke run" if smoke else "not published: "
                                  + ("custom parameters" if parameters else "not every notebook")
                                  + " (--publish publishes it)")
        summary = {
            "run": run_dir.name, "git_revision": revision, "smoke": smoke, "published": suite.published,
            "started_utc": started.isoformat(timespec="seconds"), "seconds": round(suite.seconds, 1),
            # the run's parameters as given (`-p`, and smoke), then what each notebook got (parameters.json)
            "environment": env, "parameters": {**parameters, **({"smoke": True} if smoke else {})},
            "notebook_parameters": {nb: v for nb, v in resolved.items() if v},
            "notebooks": [{k: v for k, v in asdict(r).items() if k not in ("html_path", "parameters")} for r in runs],
            "headlines": read_headlines(run_dir / "results"),
        }
        _write_json(run_dir / "summary.json", summary)
        if suite.published:
            if readme is None and Path(reports_dir).resolve() == REPORTS_DIR.resolve():
                readme = README
            publish(run_dir, reports_dir, results_dir, readme)
    finally:
        if old_revision is None:
            os.environ.pop(REVISION_VARIABLE, None)
        else:
            os.environ[REVISION_VARIABLE] = old_revision
    return suite


__all__ = ["run_suite", "run_notebook", "discover", "publish", "SuiteRun", "NotebookRun", "ConsoleReporter",
           "Reporter", "RUNS_DIR", "REPORTS_DIR", "NOTEBOOKS_DIR"]
