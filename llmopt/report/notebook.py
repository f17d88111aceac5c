"""What every notebook calls once, before its first table: display settings shared by the reports."""
from __future__ import annotations


def setup_display() -> None:
    """Tables show whole strings (verdicts, conditions, samples) and every column, in JupyterLab and in the
    HTML reports alike."""
    import pandas as pd

    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_columns", None)
    pd.set_option("display.width", 200)
