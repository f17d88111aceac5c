import os

import pytest
import torch


def threads_per_worker() -> int:
    """Intra-op threads for each pytest process: the cores shared among the xdist workers (`make test` runs
    `-n 2` on 2 cores: one thread each). More threads than cores makes OpenMP's barriers wait on descheduled
    threads; every test asserts correctness, not speed, so the count changes no result."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


THREADS = threads_per_worker()
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # notebook kernels started by the smoke runs inherit it
torch.set_num_threads(THREADS)

REAL_MODEL_FIXTURES = {"default_model", "default_hf_model"}


def pytest_collection_modifyitems(items):
    """A test that loads the real default model is end-to-end, whatever its file: the `e2e` mark follows from
    the fixtures it uses, so `make test-fast` never loads the model by accident."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def isolated_results(tmp_path, monkeypatch):
    """Tests never write into data/results/: results go to a temporary directory."""
    monkeypatch.setenv("LLMOPT_RESULTS_DIR", str(tmp_path / "results"))


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), fp32, loaded once per session."""
    from llmopt.engine.loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def default_hf_model(default_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model.checkpoint, dtype=torch.float32).eval()


@pytest.fixture(params=["llmopt", "torch"])
def kernels(request):
    """Run the test on our CPU kernels (skipped where they do not build) and on PyTorch's."""
    from llmopt.engine import cpu_kernels

    if request.param == "llmopt":
        if not cpu_kernels.available():
            pytest.skip(f"llmopt CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
        yield request.param
    else:
        with cpu_kernels.switched_off():
            yield request.param
