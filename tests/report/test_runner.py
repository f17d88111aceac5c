"""The suite runner on tiny notebooks (no model): run folders, progress lines, failures, publishing, revision."""
from __future__ import annotations

import io
import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from llmopt import cli
from llmopt.report import parameters, runner
from llmopt.report.readme import HEADLINE_END, HEADLINE_START

HEADLINE = '''import json, os, pathlib
results = pathlib.Path(os.environ["LLMOPT_RESULTS_DIR"])
results.mkdir(parents=True, exist_ok=True)
(results / "{name}.csv").write_text("x,tokens\\n1," + str(tokens) + "\\n")
(results / "headline_{name}.json").write_text(json.dumps({{
    "notebook": "{name}", "title": "Tiny {name}", "key_figure": f"{{tokens}} tok/s", "verdict": "ok", "table": None,
    "git_revision": os.environ.get("LLMOPT_GIT_REVISION", "unset")}}))
headline = results / "headline_{name}.json"'''


def tiny_notebook(directory, name: str, fail: bool = False):
    cells = [new_markdown_cell(f"# {name}: a tiny notebook"), new_code_cell("tokens = 4  # tokens per second")]
    cells[1].metadata["tags"] = ["parameters"]
    if fail:  # writes results, then fails: nothing of it may be kept
        cells.append(new_code_cell('import os, pathlib\n'
                                   'pathlib.Path(os.environ["LLMOPT_RESULTS_DIR"], "partial.csv").write_text("x")'))
        cells.append(new_code_cell('raise ValueError("boom at " + str(tokens))'))
    else:
        cells.append(new_code_cell(HEADLINE.format(name=name)))
    metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                "language_info": {"name": "python"}}
    nbformat.write(new_notebook(cells=cells, metadata=metadata), str(directory / f"{name}.ipynb"))


@pytest.fixture
def notebooks(tmp_path, monkeypatch):
    directory = tmp_path / "notebooks"
    directory.mkdir()
    tiny_notebook(directory, "00_ok")
    tiny_notebook(directory, "01_fail", fail=True)
    for name in ("00_ok", "01_fail"):
        monkeypatch.setitem(parameters.DECLARED, name, {"tokens": parameters.Param("int", min=1)})
        monkeypatch.setitem(parameters.SMOKE, name, {"tokens": 2})
    return directory


def run(tmp_path, notebooks, names=None, values=None, smoke=False, stream=None, **kw):
    reporter = runner.ConsoleReporter(stream=stream or io.StringIO(), live=False)
    return runner.run_suite(names, values, smoke, runs_dir=tmp_path / "runs", reports_dir=tmp_path / "reports",
                            results_dir=tmp_path / "published", notebooks_dir=notebooks, reporter=reporter, **kw)


@pytest.mark.notebook  # starts kernels (seconds)
def test_a_run_folder_keeps_what_finished_and_names_the_failing_cell(tmp_path, notebooks, monkeypatch):
    monkeypatch.setenv("LLMOPT_GIT_REVISION", "abc1234")
    out = io.StringIO()
    suite = run(tmp_path, notebooks, values={"tokens": 7}, stream=out)
    assert [r.ok for r in suite] == [True, False]
    printed = out.getvalue()
    assert "[1/2] 00_ok: started" in printed and "[1/2] 00_ok: ok in" in printed and "7 tok/s" in printed
    assert "[2/2] 01_fail: FAILED" in printed
    assert ("raise ValueError(\"boom at \" + str(tokens))" in suite[1].error
            and "ValueError: boom at 7" in suite[1].error)
    d = suite.run_dir
    assert d.parent == tmp_path / "runs"
    assert {p.name for p in d.iterdir()} == {"00_ok.ipynb", "00_ok.html", "01_fail.failed.ipynb", "index.html",
                                            "results", "summary.json", "environment.json", "parameters.json"}
    assert {p.name for p in (d / "results").iterdir()} == {"00_ok.csv", "headline_00_ok.json"}  # no partial.csv
    assert json.loads((d / "parameters.json").read_text()) == {"00_ok": {"tokens": 7}, "01_fail": {"tokens": 7}}
    summary = json.loads((d / "summary.json").read_text())
    assert summary["headlines"]["00_ok"]["git_revision"] == "abc1234" == summary["git_revision"]
    assert [n["ok"] for n in summary["notebooks"]] == [True, False] and not summary["published"]
    assert summary["parameters"] == {"tokens": 7}  # as given; per notebook in parameters.json
    assert not suite.published and "01_fail failed" in suite.publish_note
    assert not (tmp_path / "reports").exists() and not (tmp_path / "published").exists()


@pytest.mark.notebook  # starts kernels (seconds)
def test_a_complete_default_run_is_published_and_a_custom_or_smoke_one_is_not(tmp_path, notebooks):
    (notebooks / "01_fail.ipynb").unlink()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{HEADLINE_START}\nold\n{HEADLINE_END}\nrest\n")
    smoke = run(tmp_path, notebooks, smoke=True, readme=readme)
    assert smoke.ok and not smoke.published and "smoke" in smoke.publish_note
    assert json.loads((smoke.run_dir / "parameters.json").read_text()) == {"00_ok": {"tokens": 2}}
    custom = run(tmp_path, notebooks, values={"tokens": 5}, readme=readme)
    assert custom.ok and not custom.published
    assert not (tmp_path / "reports").exists() and "old" in readme.read_text()
    default = run(tmp_path, notebooks, readme=readme)
    assert default.ok and default.published
    assert (tmp_path / "reports" / "00_ok.html").exists() and (tmp_path / "reports" / "index.html").exists()
    assert (tmp_path / "published" / "headline_00_ok.json").exists()
    text = readme.read_text()
    assert "old" not in text and "4 tok/s" in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert len(list((tmp_path / "runs").iterdir())) == 3  # one folder per run


@pytest.mark.notebook  # starts kernels (seconds)
def test_explicit_publish_of_a_custom_run_and_never_of_a_smoke_run(tmp_path, notebooks):
    with pytest.raises(parameters.InvalidParameterError, match="smoke"):
        run(tmp_path, notebooks, ["00"], smoke=True, publish_to=True)
    assert not (tmp_path / "runs").exists()
    suite = run(tmp_path, notebooks, ["00"], values={"tokens": 9}, publish_to=True, readme=None)
    assert suite.published and "9 tok/s" in (tmp_path / "published" / "headline_00_ok.json").read_text()


def test_the_live_line_shows_the_suite_and_the_running_cell_and_is_cleared():
    out = io.StringIO()
    reporter = runner.ConsoleReporter(stream=out, live=True)
    reporter.notebook_started(1, 2, "00_x", 5)
    reporter.cell_started("00_x", 2, 5, 1, 9, "results = measure()")
    assert out.getvalue().endswith("suite 1/9 cells · 00_x cell 2/5: results = measure()")
    reporter.notebook_done(1, 2, runner.NotebookRun("00_x", True, 3.0, key_figure="2.0x"), 5, 9)
    last = out.getvalue().split("\r")[-1]
    assert last == "[1/2] 00_x: ok in 3.0 s: 2.0x (suite 5/9 cells)\n"


def test_the_failure_line_names_the_cell_and_the_error():
    class Failure(Exception):
        ename, evalue, exec_count = "RuntimeError", "\x1b[0;31mshapes do not match\nmore", 4
        source = "# comment\nresults = benchmark.compare(engines)\nmore()"

    line, cell = runner.error_line(Failure())
    assert line == "cell [4] `results = benchmark.compare(engines)` raised RuntimeError: shapes do not match"
    assert cell == "results = benchmark.compare(engines)"


def test_generate_prints_a_timing_line():
    assert cli.timing_line(12, [0.5, 0.6, 0.7]) == (
        "prompt 12 tokens, time to first token 500.0 ms (24.0 tokens/s) | decode 2 tokens in 0.20 s, 10.0 tokens/s"
        " | total 3 tokens in 0.70 s")
    assert "decode 0 tokens" in cli.timing_line(3, [0.1])


def test_compare_is_wired_to_the_comparison_page(tmp_path, capsys):
    runs = []
    for i, figure in enumerate(("3.0x", "2.5x")):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "run": d.name, "environment": {"cpu": "test cpu", "torch_threads": 2}, "parameters": {},
            "headlines": {"00_x": {"notebook": "00_x", "title": "X", "key_figure": figure, "verdict": "ok",
                                   "table": None}}}))
        runs.append(str(d))
    out = tmp_path / "compare.html"
    assert cli.main(["compare", *runs, "-o", str(out)]) == 0
    assert "3.0x" in out.read_text() and "2.5x" in out.read_text()
    assert cli.main(["compare", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
