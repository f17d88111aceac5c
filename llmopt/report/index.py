"""The index page of a folder of reports: one card per executed notebook with its key figure, and the environment.

With `llmopt.report.html` present the page is its `index_html`; without it, the plain page below."""
from __future__ import annotations

import datetime as _dt
import html
import json
import os
from pathlib import Path

from ..bench.environment import environment


def read_headlines(results_dir: Path) -> dict[str, dict]:
    """Each notebook's headline record (`headline_<notebook>.json`) in `results_dir`, by notebook."""
    out = {}
    for f in sorted(Path(results_dir).glob("headline_*.json")):
        record = json.loads(f.read_text())
        out[record["notebook"]] = record
    return out


def ran_on(h: dict) -> str:
    """Where a headline's notebook ran, from its recorded environment: the CPU and its threads, or the GPU."""
    threads = f"{h.get('cpu', '?')} ({h.get('torch_threads', '?')} threads)"
    if str(h.get("device", "cpu")).startswith("cuda"):
        return f"{h.get('device_name', '?')} (host {threads})"
    return threads


def generated_at(headline: dict, report: Path) -> _dt.datetime:
    """When a notebook's results were measured: its headline's timestamp (a clone or a copy resets the report
    file's mtime), else the report file's mtime."""
    try:
        return _dt.datetime.fromisoformat(headline["timestamp_utc"]).astimezone(_dt.timezone.utc)
    except (KeyError, TypeError, ValueError):
        return _dt.datetime.fromtimestamp(report.stat().st_mtime, _dt.timezone.utc)


def cards(reports_dir: Path, results_dir: Path) -> list[dict]:
    """One card per `NN_*.html` report in `reports_dir`, with the headline its notebook saved in `results_dir`."""
    headlines = read_headlines(results_dir)
    out = []
    for report in sorted(Path(reports_dir).glob("[0-9][0-9]_*.html")):
        h = headlines.get(report.stem, {})
        out.append({"name": report.stem, "href": report.name, "title": h.get("title", report.stem),
                    "key_figure": h.get("key_figure", ""), "verdict": h.get("verdict", ""), "table": h.get("table"),
                    "generated": generated_at(h, report), "git_revision": h.get("git_revision", "?"),
                    "ran_on": ran_on(h) if h else ""})
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


def plain_index_html(card_list: list[dict], env: dict) -> str:
    """The index page without `llmopt.report.html`."""
    sections = "".join(
        f"<section class='card'><h2><a href='{html.escape(c['href'])}'>{html.escape(c['title'])}</a></h2>"
        f"<p class='figure'>{html.escape(c['key_figure'])}</p><p class='verdict'>{html.escape(c['verdict'])}</p>"
        f"{_table_html(c['table'])}<p class='meta'>generated {c['generated']:%Y-%m-%d %H:%M} UTC · git "
        f"{html.escape(c['git_revision'])} · {html.escape(c['ran_on'])}</p></section>" for c in card_list)
    env_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in env.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>llmopt reports</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
.card{{border:1px solid #ddd;border-radius:8px;padding:0.6em 1.2em;margin:1em 0}}
.figure{{font-size:1.15em;font-weight:600}} .verdict{{color:#444}} .meta{{color:#777;font-size:0.85em}}
table{{border-collapse:collapse;margin:0.5em 0}} td,th{{border:1px solid #ddd;padding:2px 8px;text-align:left}}</style>
</head><body><h1>llmopt — measured LLM inference optimizations</h1>
<p>Every figure below was measured by the linked notebook on the machine described at the bottom. The design
document's numbers appear in the reports only beside measured ones, labeled as estimates.</p>
{sections or '<p>No reports yet: run <code>make report</code>.</p>'}
<h2>Environment of this index build</h2><table>{env_rows}</table></body></html>"""


def build_index(reports_dir: Path, results_dir: Path | None = None, env: dict | None = None) -> Path:
    """Write `<reports_dir>/index.html` (atomically): one card per report, and the environment `env` (default:
    this process's)."""
    from ..bench.harness import results_dir as default_results_dir

    results_dir = Path(results_dir) if results_dir else default_results_dir()
    card_list = cards(reports_dir, results_dir)
    env = env if env is not None else environment()
    try:
        from .html import index_html
    except ImportError:  # the document-style pages are not installed: the plain page
        page = plain_index_html(card_list, env)
    else:
        page = index_html(card_list, env)
    Path(reports_dir).mkdir(parents=True, exist_ok=True)
    target = Path(reports_dir) / "index.html"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(page)
    os.replace(tmp, target)
    return target
