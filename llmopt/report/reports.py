"""The report layer's names in one place (notebooks and older callers import them from here).

runner.py: run_suite / run_notebook (run folders, progress, publishing); index.py: the index page and the
headline records; readme.py: the README's headline block; parameters.py: every notebook's parameters, checked.
"""
from __future__ import annotations

from ..errors import LLMOptError
from .index import build_index, ran_on, read_headlines
from .readme import HEADLINE_END, HEADLINE_START, README, README_PLOT, headline_markdown, update_readme
from .runner import (
                     NOTEBOOKS_DIR,
                     REPORTS_DIR,
                     RUNS_DIR,
                     ConsoleReporter,
                     NotebookRun,
                     Reporter,
                     SuiteRun,
                     cell_seconds,
                     discover,
                     publish,
                     run_notebook,
                     run_suite,
)

__all__ = ["run_suite", "run_notebook", "build_index", "discover", "publish", "read_headlines", "update_readme",
           "headline_markdown", "ran_on", "cell_seconds", "NotebookRun", "SuiteRun", "Reporter", "ConsoleReporter",
           "README", "README_PLOT", "HEADLINE_START", "HEADLINE_END", "NOTEBOOKS_DIR", "REPORTS_DIR", "RUNS_DIR",
           "LLMOptError"]
