import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
