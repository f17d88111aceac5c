"""Every notebook runs through papermill with smoke parameters and produces its report in its run folder.

LLMOPT_TEST_DEVICE=cuda (and LLMOPT_TEST_DTYPE, LLMOPT_TEST_MODEL) run the same smoke runs on a GPU."""
import os

import pytest

from llmopt.engine.loading import default_checkpoint_dir
from llmopt.engine.testing import AWKWARD, save_random_checkpoint
from llmopt.report.runner import discover, run_suite

pytestmark = pytest.mark.notebook


def environment_parameters() -> dict:
    names = {"LLMOPT_TEST_DEVICE": "device", "LLMOPT_TEST_DTYPE": "dtype", "LLMOPT_TEST_MODEL": "model"}
    return {parameter: os.environ[var] for var, parameter in names.items() if os.environ.get(var)}


@pytest.mark.parametrize("notebook", [p.stem for p in discover()])
def test_notebook_smoke_run(notebook, tmp_path):
    run = run_suite([notebook], environment_parameters(), smoke=True, runs_dir=tmp_path / "runs",
                    reports_dir=tmp_path / "reports", results_dir=tmp_path / "published")
    assert [r.ok for r in run] == [True], run[0].error
    html = (run.run_dir / f"{notebook}.html").read_text()
    assert "Traceback" not in html
    assert (run.run_dir / "index.html").exists()
    assert (run.run_dir / f"{notebook}.ipynb").exists()
    assert any((run.run_dir / "results").glob("*.csv")), "the notebook saved no measured rows"
    assert (run.run_dir / "results" / f"headline_{notebook}.json").exists()
    assert {"summary.json", "environment.json", "parameters.json"} <= {p.name for p in run.run_dir.iterdir()}
    assert not run.published and not (tmp_path / "reports").exists() and not (tmp_path / "published").exists()


def test_quantization_notebook_on_the_pytorch_engine_alone(tmp_path):
    """03 without the fused engine (as on CUDA, or with engine="pytorch"): no engine pair to compare, still a report."""
    run = run_suite(["03_quantization"], {**environment_parameters(), "engine": "pytorch"}, smoke=True,
                    runs_dir=tmp_path / "runs")
    assert [r.ok for r in run] == [True], run[0].error
    assert "No engine pair in this run" in (run.run_dir / "03_quantization.html").read_text()


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory):
    """Seeded random-weight Llama / Qwen2 / Mistral checkpoints with awkward widths (testing.AWKWARD), saved
    to disk with SmolLM2's tokenizer, as a user's own checkpoint would be."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: save_random_checkpoint(root / family, family, default_checkpoint_dir()) for family in AWKWARD}


@pytest.mark.parametrize("notebook", [p.stem for p in discover()])
@pytest.mark.parametrize("family", sorted(AWKWARD))
def test_notebook_smoke_run_on_a_random_checkpoint(family, notebook, random_checkpoints, tmp_path):
    """Any checkpoint of the three families through every notebook: widths 64 does not divide, odd head
    counts, GQA 1 and 4, tied and untied heads, a sliding window (Mistral)."""
    run = run_suite([notebook], {"model": str(random_checkpoints[family])}, smoke=True, runs_dir=tmp_path / "runs")
    assert [r.ok for r in run] == [True], run[0].error
    assert "Traceback" not in (run.run_dir / f"{notebook}.html").read_text()
