"""Bad input: one clear error, no partial result files."""
import json

import pytest

from llmopt.errors import ModelNotFoundError, UnsupportedModelError
from llmopt.engine.loading import load_model


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(str(tmp_path))


def test_unknown_dtype():
    from llmopt.errors import InvalidParameterError
    from llmopt.engine.loading import resolve_dtype

    with pytest.raises(InvalidParameterError, match="unknown dtype"):
        resolve_dtype("int3")


@pytest.mark.notebook
def test_cli_bad_model_leaves_no_report(tmp_path, capsys):
    from llmopt.cli import main

    reports, results = tmp_path / "reports", tmp_path / "results"
    code = main(["run", "00", "--smoke", "-p", "model=/no/such/model", "--reports-dir", str(reports),
                 "--results-dir", str(results)])
    out = capsys.readouterr().out
    assert code == 1
    assert "ModelNotFoundError" in out and "/no/such/model" in out
    assert not (reports / "00_baseline.html").exists()
    assert not results.exists() or not any(results.glob("*.csv"))


def test_cli_bad_parameter_is_one_line(capsys):
    from llmopt.cli import main

    assert main(["run", "no-such-notebook"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmopt: error: no notebook matches")
