"""Runs side by side: compare_runs puts each run's key figures and intervals in adjacent columns."""
from __future__ import annotations

import json

import pytest
from bs4 import BeautifulSoup

from llmopt.errors import InvalidParameterError
from llmopt.report.compare import compare_runs


def write_run(folder, cpu, threads, speedup, low, high, parameters):
    folder.mkdir(parents=True)
    env = {"cpu": cpu, "cpu_isa": "x86-64-v3", "torch_threads": threads, "git_revision": "abc123",
           "timestamp_utc": "2026-01-01T10:00:00+00:00"}
    summary = {"environment": env, "parameters": parameters, "headlines": {"01_kv_cache": {
        "title": "KV cache", "key_figure": f"{speedup}x faster decode", "verdict": "as estimated", "table": None,
        "figures": [{"label": "decode speedup", "estimate": speedup, "low": low, "high": high, "unit": "x",
                     "rounds": 8}], **env}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def rows(page):
    """{row label: [cell per run]} of every table on the page."""
    soup = BeautifulSoup(page, "html.parser")
    return {tr.th.get_text(): [td.get_text() for td in tr.find_all("td")] for tr in soup.select("tbody tr")}


def test_two_runs_side_by_side(tmp_path):
    a = write_run(tmp_path / "laptop", "Laptop CPU", 4, 3.1, 2.9, 3.3, {"threads": 4, "repeats": 8, "smoke": False})
    b = write_run(tmp_path / "server", "Server CPU", 16, 5.2, 4.8, 5.6, {"threads": 16, "repeats": 8, "smoke": False})
    out = compare_runs([a, b], tmp_path / "out" / "compare.html")
    assert out == tmp_path / "out" / "compare.html" and list(out.parent.iterdir()) == [out]  # no temporary left
    table = rows(out.read_text())
    assert table["machine"] == ["Laptop CPU", "Server CPU"]
    assert table["threads"] == ["4", "16"]
    assert table["parameter threads"] == ["4", "16"]
    assert "parameter repeats" not in table, "a parameter both runs share is listed"
    assert table["key figure"] == ["3.1x faster decode", "5.2x faster decode"]
    assert table["decode speedup"] == ["3.1 x (95% CI 2.9–3.3, 8 rounds)", "5.2 x (95% CI 4.8–5.6, 8 rounds)"]
    assert "Only one run" not in out.read_text()


def test_one_run_is_allowed_and_said(tmp_path):
    a = write_run(tmp_path / "only", "Laptop CPU", 4, 3.1, 2.9, 3.3, {"threads": 4})
    page = compare_runs([a], tmp_path / "compare.html").read_text()
    assert "Only one run" in page and "3.1x faster decode" in page


def test_folder_without_summary_is_named(tmp_path):
    a = write_run(tmp_path / "good", "Laptop CPU", 4, 3.1, 2.9, 3.3, {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidParameterError, match="empty.*summary.json"):
        compare_runs([a, tmp_path / "empty"], tmp_path / "compare.html")
    with pytest.raises(InvalidParameterError, match="at least one"):
        compare_runs([], tmp_path / "compare.html")
    assert not (tmp_path / "compare.html").exists()
