"""Every notebook runs through papermill with smoke parameters and produces its report in its run folder.

LLMOPT_TEST_DEVICE=cuda (and LLMOPT_TEST_DTYPE, LLMOPT_TEST_MODEL) run the same smoke runs on a GPU."""
import os

import pytest
import torch

from llmopt.engine.loading import default_checkpoint_dir
from llmopt.engine.testing import AWKWARD, save_random_checkpoint
from llmopt.report.runner import discover, run_suite

pytestmark = pytest.mark.notebook


def environment_parameters() -> dict:
    """The device, dtype and model the environment asks for, and this test process's thread count (conftest: the
    cores shared among the xdist workers)."""
    names = {"LLMOPT_TEST_DEVICE": "device", "LLMOPT_TEST_DTYPE": "dtype", "LLMOPT_TEST_MODEL": "model"}
    return {"threads": torch.get_num_threads(),
            **{parameter: os.environ[var] for var, parameter in names.items() if os.environ.get(var)}}


@pytest.mark.parametrize("notebook", [p.stem for p in discover()])
def test_notebook_smoke_run(notebook, tmp_path):
    run = run_suite([notebook], environment_parameters(), smoke=True, runs_dir=tmp_path / "runs",
                    reports_dir=tmp_path / "reports", results_dir=tmp_path / "published")
    assert [r.ok for r in run] == [True], run[0].error
    html = (run.run_dir / f"{notebook}.html").read_text()
    assert "Traceback" not in html
    assert "llmopt-plot-problem" not in html, "a plot failed llmopt.report.figures' checks (see the red block)"
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


def run_in_one_kernel(notebooks: list, parameters: dict, results_dir) -> dict:
    """Execute `notebooks` one after another in ONE kernel (its namespace reset between them), each with its
    smoke settings and `parameters`: the runner's own path is what the default model's smoke runs test; here
    the subject is the model, and one kernel saves each notebook its ~12 s of imports. Returns name -> error."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from llmopt.report.parameters import resolve

    env = {**os.environ, "LLMOPT_RESULTS_DIR": str(results_dir), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(notebooks[0].parent), env=env)
    errors = {}
    try:
        for path in notebooks:
            notebook = parameterize_notebook(load_notebook_node(str(path)),
                                                       resolve(path.stem, parameters, smoke=True))
            notebook.cells.insert(0, nbformat.v4.new_code_cell("%reset -f\nimport matplotlib.pyplot\n"
                                                               "matplotlib.pyplot.close('all')"))
            try:
                NotebookClient(notebook, km=manager, timeout=600,
                               resources={"metadata": {"path": str(path.parent)}}).execute()
            except CellExecutionError as exc:
                errors[path.stem] = str(exc).strip().splitlines()[-1]
    finally:
        manager.shutdown_kernel(now=True)
    return errors


@pytest.mark.parametrize("family", sorted(AWKWARD))
def test_every_notebook_runs_on_a_random_checkpoint(family, random_checkpoints, tmp_path):
    """Any checkpoint of the three families through every notebook, in smoke mode: widths 64 does not divide,
    odd head counts, GQA 1 and 4, tied and untied heads, a sliding window (Mistral)."""
    notebooks = discover()
    errors = run_in_one_kernel(notebooks, {**environment_parameters(), "model": str(random_checkpoints[family])},
                               tmp_path / "results")
    assert not errors, errors
    saved = {p.name for p in (tmp_path / "results").glob("headline_*.json")}
    assert saved == {f"headline_{p.stem}.json" for p in notebooks}
