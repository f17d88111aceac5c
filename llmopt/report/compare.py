"""Runs side by side: one HTML page comparing the key figures of several run folders (each with a summary.json).

A summary.json: {"environment": {...}, "parameters": {...}, "headlines": {notebook: {"title", "key_figure",
"verdict", "table", "figures": [{"label", "estimate", "low", "high", "unit", "rounds"}, ...], ...}}}.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import InvalidParameterError
from .html import format_value, format_when, page_environment

MISSING = "—"
GENERATOR = "llmopt comparison"


def load_summary(run_dir: Path) -> dict:
    """A run folder's summary.json, or InvalidParameterError naming the folder."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise InvalidParameterError(f"{run_dir}: no summary.json; is it a run folder?")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidParameterError(f"{path}: not readable as JSON ({exc})") from exc
    if not isinstance(summary, dict):
        raise InvalidParameterError(f"{path}: expected a JSON object")
    return summary


def _environment(summary: dict) -> dict:
    """The run's environment; keys it lacks are taken from its first headline's recorded environment."""
    headlines = list((summary.get("headlines") or {}).values())
    return {**(headlines[0] if headlines else {}), **(summary.get("environment") or {})}


def _isa(env: dict) -> str:
    if env.get("cpu_isa"):
        return str(env["cpu_isa"])
    flags = [name for key, name in (("cpu_amx", "AMX"), ("cpu_avx512", "AVX-512")) if env.get(key)]
    return ", ".join(flags) or MISSING


def _machine(env: dict) -> str:
    cpu = str(env.get("cpu") or MISSING)
    if str(env.get("device", "cpu")).startswith("cuda"):
        return f"{env.get('device_name', '?')} (host {cpu})"
    return cpu


def _header_rows(summaries: list[dict]) -> list[tuple[str, list[str]]]:
    """(row label, one value per run): machine, ISA, threads, git, model, timestamp, parameters that differ."""
    envs = [_environment(s) for s in summaries]
    params = [s.get("parameters") or {} for s in summaries]
    rows = [("machine", [_machine(e) for e in envs]),
            ("ISA", [_isa(e) for e in envs]),
            ("threads", [format_value(e.get("torch_threads")) for e in envs]),
            ("git revision", [format_value(e.get("git_revision")) for e in envs]),
            ("model", [str(p.get("model") or e.get("model") or "default") for p, e in zip(params, envs)]),
            ("timestamp", [format_when(e.get("timestamp_utc")) or MISSING for e in envs])]
    keys = sorted({key for p in params for key in p} - {"model"})
    for key in keys:
        values = [json.dumps(p[key]) if key in p else MISSING for p in params]
        if len(summaries) == 1 or len(set(values)) > 1:
            rows.append((f"parameter {key}", values))
    return rows


def format_figure(figure: dict) -> str:
    """'1.82 x (95% CI 1.70–1.95, 8 rounds)' from a {"estimate", "low", "high", "unit", "rounds"} record."""
    unit = f" {figure['unit']}" if figure.get("unit") else ""
    text = f"{format_value(figure.get('estimate'))}{unit}"
    details = []
    if figure.get("low") is not None and figure.get("high") is not None:
        details.append(f"95% CI {format_value(figure['low'])}–{format_value(figure['high'])}")
    if figure.get("rounds") is not None:
        details.append(f"{figure['rounds']} rounds")
    return f"{text} ({', '.join(details)})" if details else text


def _notebook_rows(headlines: list[dict | None]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per run) for one notebook: key figure, verdict, then every figure by label."""
    rows = [("key figure", [h.get("key_figure") or MISSING if h else MISSING for h in headlines]),
            ("verdict", [h.get("verdict") or MISSING if h else MISSING for h in headlines])]
    labels = list(dict.fromkeys(f["label"] for h in headlines if h for f in h.get("figures") or []))
    for label in labels:
        cells = []
        for h in headlines:
            figure = next((f for f in (h or {}).get("figures") or [] if f["label"] == label), None)
            cells.append(format_figure(figure) if figure else MISSING)
        rows.append((label, cells))
    return rows


def _run_labels(run_dirs: list[Path]) -> list[str]:
    names = [Path(d).resolve().name or str(d) for d in run_dirs]
    return [name if names.count(name) == 1 else f"{name} ({i + 1})" for i, name in enumerate(names)]


def _write_atomically(output: Path, text: str) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=output.parent, prefix=f".{output.name}.", suffix=".tmp",
                                     delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, output)


def compare_runs(run_dirs: list[Path], output: Path) -> Path:
    """Write an HTML page to `output` putting the runs in `run_dirs` side by side; returns `output`.

    One column per run: a header (machine, ISA, threads, git revision, model, timestamp, the parameters that
    differ), then per notebook the key figure, verdict and every figure with its interval. One run is allowed
    (the page says there is nothing to compare against); none is an InvalidParameterError."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise InvalidParameterError("compare_runs needs at least one run folder")
    summaries = [load_summary(d) for d in run_dirs]
    names = list(dict.fromkeys(n for s in summaries for n in sorted(s.get("headlines") or {})))
    notebooks = []
    for name in sorted(names):
        headlines = [(s.get("headlines") or {}).get(name) for s in summaries]
        title = next(h.get("title") or name for h in headlines if h)
        notebooks.append({"name": name, "title": title, "rows": _notebook_rows(headlines)})
    page = page_environment().get_template("compare.html.j2").render(
        runs=_run_labels(run_dirs), header=_header_rows(summaries), notebooks=notebooks, generator=GENERATOR)
    output = Path(output)
    _write_atomically(output, page)
    return output


__all__ = ["compare_runs", "load_summary", "format_figure"]
