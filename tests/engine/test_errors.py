"""Bad input: one clear error, no partial result files."""
import re
import shutil

import numpy as np
import pytest
import torch

from llmopt.cli import main
from llmopt.engine import gptq, quantization
from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.loading import load_model, resolve_device
from llmopt.engine.testing import tiny_model, tiny_pair
from llmopt.errors import InvalidParameterError, ModelNotFoundError, UnsupportedModelError


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
    from llmopt.engine.loading import resolve_dtype
    from llmopt.errors import InvalidParameterError

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


# ---- issue 22: bad input that escaped as a raw traceback or was silently accepted ---------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved with save_pretrained, with a one-character-per-token tokenizer (vocab 96)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    tiny_pair()[0].save_pretrained(path)
    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}  # printable ASCII: ids 1..95
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def decoder(checkpoint):
    lm = load_model(str(checkpoint))
    return Decoder(lm.model, lm.tokenizer)


def broken_copy(checkpoint, tmp_path, name, damage):
    """A copy of `checkpoint` with file `name` replaced by `damage(its bytes)`."""
    copy = tmp_path / "broken"
    shutil.copytree(checkpoint, copy)
    (copy / name).write_bytes(damage((copy / name).read_bytes()))
    return copy


def cli_error(capsys, *argv) -> str:
    """Run `llmopt ...` in-process; it must exit 2 with one line on stderr, which is returned."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("llmopt: error: "), (code, err)
    return err[0]


@pytest.mark.parametrize("ids", [[5, 96], [-1, 5]])
def test_prompt_token_id_outside_the_vocabulary(ids):
    with pytest.raises(InvalidParameterError, match=r"outside the model's vocabulary: ids must be in \[0, 96\)"):
        Decoder(tiny_model()).generate(ids, GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize("value", [2.5, "8", True, None])
def test_max_new_tokens_must_be_an_int(value):
    with pytest.raises(InvalidParameterError, match="max_new_tokens must be an int >= 1"):
        GenerationConfig(max_new_tokens=value)
    with pytest.raises(InvalidParameterError, match="max_new_tokens must be positive"):
        GenerationConfig(max_new_tokens=-3)
    assert GenerationConfig(max_new_tokens=np.int64(3)).max_new_tokens == 3


def test_cli_max_new_tokens_zero_is_one_line(checkpoint, capsys):
    line = cli_error(capsys, "generate", "hi", "--model", str(checkpoint), "--max-new-tokens", "0")
    assert "max_new_tokens must be positive" in line


@pytest.mark.parametrize("options,name", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature="0.7"), "temperature"),
    (dict(top_k=2.5), "top_k"), (dict(top_k=-1), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_sampling_parameters_must_be_finite_and_in_range(options, name):
    with pytest.raises(InvalidParameterError, match=f"^{name} must be"):
        GenerationConfig(**options)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_cli_temperature_not_finite_is_one_line(checkpoint, capsys, value):
    line = cli_error(capsys, "generate", "hi", "--model", str(checkpoint), "--temperature", value)
    assert f"temperature must be a finite number >= 0 (0 = greedy), got {value}" in line


def test_stop_strings_must_be_non_empty_strings():
    with pytest.raises(InvalidParameterError, match="non-empty strings"):
        GenerationConfig(stop_strings=("",))
    with pytest.raises(InvalidParameterError, match="non-empty strings"):
        GenerationConfig(stop_strings=(1,))
    with pytest.raises(InvalidParameterError, match=re.escape("not one string: use ('abc',)")):
        GenerationConfig(stop_strings="abc")
    assert GenerationConfig(stop_strings=["a", "bc"]).stop_strings == ("a", "bc")


def test_prompt_with_a_lone_surrogate(decoder):
    with pytest.raises(InvalidParameterError, match="the prompt is not valid UTF-8 text"):
        decoder.generate("hi \udcff", GenerationConfig(max_new_tokens=2))


def test_cli_prompt_with_a_lone_surrogate_is_one_line(checkpoint, capsys):
    line = cli_error(capsys, "generate", "hi \udcff", "--model", str(checkpoint), "--max-new-tokens", "2")
    assert "the prompt is not valid UTF-8 text" in line


def test_unknown_or_unavailable_device(monkeypatch):
    with pytest.raises(InvalidParameterError, match="unknown device 'tpu'; use 'cpu' or 'cuda'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidParameterError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cli_unknown_device_is_one_line(checkpoint, capsys):
    assert "unknown device 'tpu'" in cli_error(capsys, "generate", "hi", "--model", str(checkpoint),
                                               "--device", "tpu")


def test_truncated_safetensors(checkpoint, tmp_path, capsys):
    broken = broken_copy(checkpoint, tmp_path, "model.safetensors", lambda data: data[:1000])
    message = f"{broken / 'model.safetensors'} is not a readable safetensors file: "
    with pytest.raises(ModelNotFoundError, match=re.escape(message)):
        load_model(str(broken))
    assert message in cli_error(capsys, "generate", "hi", "--model", str(broken))


def test_invalid_config_json(checkpoint, tmp_path, capsys):
    broken = broken_copy(checkpoint, tmp_path, "config.json", lambda data: data[:20])
    message = f"{broken / 'config.json'} is not a readable JSON file: "
    with pytest.raises(ModelNotFoundError, match=re.escape(message)):
        load_model(str(broken))
    assert message in cli_error(capsys, "generate", "hi", "--model", str(broken))


@pytest.mark.parametrize("ids,match", [
    (torch.zeros(0, 8, dtype=torch.long), r"shape \[n_samples >= 1, length >= 1\], got \[0, 8\]"),
    (torch.zeros(2, 0, dtype=torch.long), r"shape \[n_samples >= 1, length >= 1\], got \[2, 0\]"),
    (torch.zeros(8, dtype=torch.long), r"got \[8\]"),
    (torch.zeros(2, 8), "integer tensor"),
    (torch.full((2, 8), 96), r"token ids in \[0, 96\)"),
])
def test_gptq_calibration_ids_are_checked(ids, match):
    with pytest.raises(InvalidParameterError, match=match):
        quantization.quantize_model(tiny_model(), "gptq", group_size=32, calibration_ids=ids)


def test_gptq_zero_calibration_samples():
    class Characters:
        def __call__(self, text):
            return type("Encoded", (), {"input_ids": [ord(c) % 96 for c in text]})()

    with pytest.raises(InvalidParameterError, match="calibration samples must be an int >= 1, got 0"):
        gptq.calibration_batch(Characters(), "some calibration text " * 10, samples=0, length=8)


@pytest.mark.parametrize("prompt,match", [
    (b"\xff\xfe hi", "not bytes"), (bytearray(b"hi"), "not bytes"),
    ([1.0, 2.0], r"must be ints \(one flat sequence\), got 1.0 \(float\) at position 0"),
    ([[1, 2]], r"got \[1, 2\] \(list\)"), (torch.tensor([[1, 2]]), r"got \[1, 2\] \(list\)"),
    ([1, True], r"got True \(bool\) at position 1"), (None, "got NoneType"), (7, "got int"),
])
def test_encode_refuses_what_is_neither_text_nor_token_ids(prompt, match):
    with pytest.raises(InvalidParameterError, match=match):
        Decoder(tiny_model()).encode(prompt)


def test_encode_still_takes_ids_in_any_integer_sequence(decoder):
    expected = [1, 5, 9]
    for prompt in ([1, 5, 9], (1, 5, 9), torch.tensor([1, 5, 9]), np.array([1, 5, 9]), range(1, 10, 4)):
        assert decoder.encode(prompt) == expected
    assert decoder.encode("hi") == [73, 74]


def test_cli_generate_still_works(checkpoint, capsys):
    assert main(["generate", "hi", "--model", str(checkpoint), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "time to first token" in err[0] and "tokens/s" in err[0]  # the timing line alone
