"""Every notebook runs through papermill with smoke parameters and produces its report.

LLMOPT_TEST_DEVICE=cuda (and LLMOPT_TEST_DTYPE, LLMOPT_TEST_MODEL) run the same smoke runs on a GPU."""
import os

import pytest

from llmopt.report.reports import discover, run_suite

pytestmark = pytest.mark.notebook


def environment_parameters() -> dict:
    names = {"LLMOPT_TEST_DEVICE": "device", "LLMOPT_TEST_DTYPE": "dtype", "LLMOPT_TEST_MODEL": "model"}
    return {parameter: os.environ[var] for var, parameter in names.items() if os.environ.get(var)}


@pytest.mark.parametrize("notebook", [p.stem for p in discover()])
def test_notebook_smoke_run(notebook, tmp_path):
    runs = run_suite([notebook], environment_parameters(), smoke=True, reports_dir=tmp_path / "reports",
                     results_dir=tmp_path / "results")
    assert [r.ok for r in runs] == [True], runs[0].error
    html = (tmp_path / "reports" / f"{notebook}.html").read_text()
    assert "Traceback" not in html
    assert (tmp_path / "reports" / "index.html").exists()
    assert any((tmp_path / "results").glob("*.csv")), "the notebook saved no measured rows"
    assert (tmp_path / "results" / f"headline_{notebook}.json").exists()


def test_quantization_notebook_on_the_pytorch_engine_alone(tmp_path):
    """03 without the fused engine (as on CUDA, or with engine="pytorch"): no engine pair to compare, still a report."""
    runs = run_suite(["03_quantization"], {**environment_parameters(), "engine": "pytorch"}, smoke=True,
                     reports_dir=tmp_path / "reports", results_dir=tmp_path / "results")
    assert [r.ok for r in runs] == [True], runs[0].error
    assert "No engine pair in this run" in (tmp_path / "reports" / "03_quantization.html").read_text()
