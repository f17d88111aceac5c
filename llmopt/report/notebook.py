"""What every notebook calls once, before its first table: display settings shared by the reports, and the
check that every plot a cell shows is readable (`figures.problems`)."""
from __future__ import annotations

import html

from IPython import get_ipython
from IPython.display import display
from matplotlib._pylab_helpers import Gcf

from llmopt.report import figures

PROBLEM_CLASS = "llmopt-plot-problem"
_STYLE = "border:2px solid #c62828;background:#fff3f3;color:#7f0000;padding:0.5em 1em;margin:0.5em 0"


def setup_display() -> None:
    """Tables show whole strings (verdicts, conditions, samples) and every column, in JupyterLab and in the
    HTML reports alike; in IPython, every figure a cell leaves open is checked after the cell (`check_figures`)."""
    import pandas as pd

    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_columns", None)
    pd.set_option("display.width", 200)
    shell = get_ipython()
    if shell is not None:
        register_figure_check(shell)


def register_figure_check(shell) -> None:
    """Run `check_figures` after every cell, before the inline backend's `flush_figures`.

    The inline backend registers `flush_figures` as a `post_execute` callback when pyplot is first imported
    (earlier in the same cell as `setup_display`); it shows the open figures and then closes them, after which
    nothing is left to check. IPython runs `post_execute` callbacks in list order and `events.register` only
    appends, so the check goes to the front of the list itself; a backend registered later appends behind it,
    and calling this again (several notebooks in one kernel) keeps one copy, at the front."""
    callbacks = shell.events.callbacks["post_execute"]
    while check_figures in callbacks:
        callbacks.remove(check_figures)
    callbacks.insert(0, check_figures)


def problem_block(found: dict[str, list[str]]) -> dict[str, str]:
    """The visible block a cell shows for the figures with problems (figure label -> problems), as a
    mime bundle: HTML for the page, plain text for a terminal."""
    items = "".join(f"<li>{html.escape(figure)}: {html.escape(problem)}</li>"
                    for figure, listed in found.items() for problem in listed)
    text = "\n".join(f"- {figure}: {problem}" for figure, listed in found.items() for problem in listed)
    return {"text/html": f'<div class="{PROBLEM_CLASS}" style="{_STYLE}"><b>Plot check failed</b> '
                         f"(llmopt.report.figures): <ul>{items}</ul></div>",
            "text/plain": f"Plot check failed (llmopt.report.figures):\n{text}"}


def check_figures() -> None:
    """Check the figures open after a cell; show a visible block listing the problems, if any. A failure of
    the check itself is shown the same way (IPython would print it to stderr, which the reports hide)."""
    found = {}
    for manager in Gcf.get_all_fig_managers():
        figure = manager.canvas.figure
        try:
            listed = figures.problems(figure)
        except Exception as error:  # noqa: BLE001 - shown to the reader instead of a hidden traceback
            listed = [f"the plot check itself failed: {error!r}"]
        if listed:
            found[f"figure {manager.num}"] = listed
    if found:
        display(problem_block(found), raw=True)
