"""Reports people read: an executed notebook as one self-contained, offline HTML page, and the index page.

`notebook_html` drops the noise a headless run leaves behind (stderr, progress bars, warnings, the bare
`PosixPath(...)` a cell returns), folds every code cell into a "code" toggle, adds a table of contents, a link
back to the index and the run's environment, and lets wide tables scroll (big ones start collapsed).
"""
from __future__ import annotations

import copy
import datetime as _dt
import re
from pathlib import Path

import jinja2
import nbformat
from bs4 import BeautifulSoup
from nbconvert import HTMLExporter

TEMPLATES = Path(__file__).parent / "templates"
GENERATOR = "llmopt report"  # <meta name="generator"> of a notebook report: tells new reports from old ones
INDEX_GENERATOR = "llmopt index"
MAX_COLUMNS, MAX_ROWS = 12, 30  # a table bigger than this starts collapsed

# a tqdm bar: " 57%|███▋  | 8/14 [00:13<00:14, 2.35s/it]", or without a total: "5it [00:01, 3.2it/s]"
_TQDM = re.compile(r"\d+%\|.*\|\s*\S+/\S+|\b\d+(?:\.\d+)?[kMG]?it \[\d+:\d+")
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")  # "/path/auto.py:21: TqdmWarning: IProgress not found..."
_PATH_REPR = ("PosixPath(", "WindowsPath(")
_WIDGET = "application/vnd.jupyter.widget-view+json"


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _noise(lines: list[str]) -> list[bool]:
    """Per line: is it a progress bar, a warning, the indented source line after a warning, or blank?"""
    flags, after_warning = [], False
    for line in lines:
        warning = bool(_WARNING.search(line))
        flags.append(not line.strip() or bool(_TQDM.search(line)) or warning
                     or (after_warning and line[:1].isspace()))
        after_warning = warning
    return flags


def _clean_text(text: str) -> str:
    """`text` without its noise lines ('' when nothing else is left)."""
    lines = re.split(r"\r\n|\r|\n", text)
    flags = _noise(lines)
    if all(flags):
        return ""
    if not any(flag and line.strip() for flag, line in zip(flags, lines)):
        return text  # only blank lines were noise: keep the text as printed
    return "\n".join(line for flag, line in zip(flags, lines) if not flag or not line.strip()).strip("\n") + "\n"


def _clean_output(output):
    """The output as a reader should see it, or None to drop it."""
    if output.output_type == "stream":
        if output.get("name") == "stderr":
            return None
        text = _clean_text(_text(output.text))
        return nbformat.from_dict({**output, "text": text}) if text else None
    if output.output_type in ("execute_result", "display_data"):
        data = output.get("data", {})
        if _WIDGET in data:
            return None  # a live widget (tqdm's bar): a static page can't show it
        plain = _text(data.get("text/plain", ""))
        if output.output_type == "execute_result" and plain.startswith(_PATH_REPR):
            return None
        if plain and set(data) == {"text/plain"} and not _clean_text(plain):
            return None  # a progress bar's or a warning's text
    return output


def clean_notebook(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of `notebook` without stderr, progress bars, warnings and `PosixPath(...)` results."""
    notebook = copy.deepcopy(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in map(_clean_output, cell.get("outputs", [])) if o is not None]
    notebook.metadata.pop("widgets", None)
    return notebook


def _exporter() -> HTMLExporter:
    return HTMLExporter(template_name="lab", template_file="notebook.html.j2",
                        extra_template_paths=[str(TEMPLATES)], exclude_input_prompt=True,
                        exclude_output_prompt=True, embed_images=True, anchor_link_text="¶")


def _heading_text(heading) -> str:
    heading = copy.copy(heading)
    for anchor in heading.select("a.anchor-link"):
        anchor.decompose()
    return heading.get_text(" ", strip=True)


def _add_toc(soup: BeautifulSoup) -> None:
    """Fill <nav class="llmopt-toc"> with the markdown headings (unique ids); the page's title heading stays out."""
    nav = soup.select_one("nav.llmopt-toc")
    headings = soup.select(".jp-RenderedMarkdown :is(h1, h2, h3)")
    title = headings[0] if headings and headings[0].name == "h1" else None
    if title is not None:
        headings = headings[1:]
    seen: set[str] = set()
    items = []
    for heading in headings:
        base = heading.get("id") or re.sub(r"\s+", "-", _heading_text(heading))
        anchor, n = base, 1
        while anchor in seen:
            n += 1
            anchor = f"{base}-{n}"
        seen.add(anchor)
        heading["id"] = anchor
        for link in heading.select("a.anchor-link"):
            link["href"] = f"#{anchor}"
        items.append((heading.name, anchor, _heading_text(heading)))
    if nav is None or not items:
        return
    title_cell = title.find_parent(class_="jp-Cell") if title is not None else None
    if title_cell is not None:
        title_cell.insert_after(nav.extract())  # contents below the title and its introduction
    ul = soup.new_tag("ul")
    for level, anchor, text in items:
        li = soup.new_tag("li", attrs={"class": f"level-{level[1]}"})
        link = soup.new_tag("a", href=f"#{anchor}")
        link.string = text
        li.append(link)
        ul.append(li)
    label = soup.new_tag("strong")
    label.string = "Contents"
    nav.extend([label, ul])


def table_shape(table) -> tuple[int, int]:
    """(body rows, columns) of a parsed <table>: header rows excluded, colspans counted."""
    rows = table.find_all("tr")
    columns = max((sum(int(c.get("colspan", 1) or 1) for c in r.find_all(["td", "th"], recursive=False))
                   for r in rows), default=0)
    body = [r for r in rows if r.find_parent("thead") is None and r.find("td", recursive=False) is not None]
    return len(body), columns


def _collapse_big_tables(soup: BeautifulSoup) -> None:
    """Wrap tables over MAX_ROWS rows or MAX_COLUMNS columns in a closed <details> with a summary line."""
    for table in soup.select(".jp-OutputArea-output table, .jp-RenderedMarkdown table"):
        if table.find_parent("details", class_="llmopt-table") is not None:
            continue
        rows, columns = table_shape(table)
        if rows <= MAX_ROWS and columns <= MAX_COLUMNS:
            continue
        details = soup.new_tag("details", attrs={"class": "llmopt-table"})
        summary = soup.new_tag("summary")
        summary.string = f"Table: {rows} rows × {columns} columns (click to expand)"
        table.wrap(details)
        details.insert(0, summary)


def notebook_html(notebook: nbformat.NotebookNode, title: str, index_href: str = "index.html",
                  environment: dict | None = None) -> str:
    """An executed notebook as a self-contained HTML document (no external scripts or stylesheets).

    Code cells are folded ("code" toggles, plus one "Show all code" button); `environment` (the run's
    environment dict) fills the footer."""
    resources = {"metadata": {"name": title},
                 "llmopt": {"generator": GENERATOR, "index_href": index_href, "environment": environment or {},
                            "machine": machine_summary(environment or {})}}
    body, _ = _exporter().from_notebook_node(clean_notebook(notebook), resources=resources)
    soup = BeautifulSoup(body, "html.parser")
    _add_toc(soup)
    _collapse_big_tables(soup)
    return str(soup)


def format_value(value) -> str:
    """A table cell for people: 3 significant digits, thousands separators past 1000, '—' for missing."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value:
            return "—"
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_when(value) -> str:
    """A timestamp (datetime or ISO string) as 'YYYY-MM-DD HH:MM UTC'; other text as given."""
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "" if value is None else str(value)


def page_environment() -> jinja2.Environment:
    """The jinja2 environment of the index and comparison pages (autoescaped, with their filters)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(fmt=format_value, when=format_when)
    env.tests["number"] = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return env


MACHINE_KEYS = (("cpu", "CPU"), ("cpu_isa", "ISA level"), ("cpu_count", "cores"), ("torch_threads", "threads"),
                ("l3_cache", "L3 cache"), ("cpu_kernels", "kernels"), ("device_name", "device"))


def machine_summary(environment: dict) -> list[tuple[str, str]]:
    """(label, value) of the machine facts present in `environment`: CPU, ISA level, cores, cache, kernels."""
    on_gpu = str(environment.get("device", "cpu")).startswith("cuda")
    return [(label, str(environment[key])) for key, label in MACHINE_KEYS
            if environment.get(key) not in (None, "") and (key != "device_name" or on_gpu)]


def index_html(cards: list[dict], environment: dict) -> str:
    """The index page: one card per report (key figure, verdict, small table, when/where it ran) and the machine.

    A card: {"name", "href", "title", "key_figure", "verdict", "table" (split-orient dict or None),
    "generated", "git_revision", "ran_on"}; missing keys render empty."""
    fields = ("name", "href", "title", "key_figure", "verdict", "table", "generated", "git_revision", "ran_on")
    cards = [{key: card.get(key) for key in fields} for card in cards]
    return page_environment().get_template("index.html.j2").render(
        cards=cards, environment=environment or {}, machine=machine_summary(environment or {}),
        generator=INDEX_GENERATOR)


__all__ = ["notebook_html", "index_html", "clean_notebook", "format_value", "format_when", "machine_summary",
           "table_shape", "GENERATOR"]
