"""Parameters are taken or refused, never silently changed (issue 27).

Every notebook parameter is declared (type, range); `llmopt run -p` refuses an unknown name, a malformed literal
or a value out of range with one message and exit status 2, before anything runs or is written; a smoke run's
settings sit under the user's values; zero and negative counts are refused where they are read."""
from __future__ import annotations

import ast
import json

import pandas as pd
import pytest

from llmopt import cli
from llmopt.errors import InvalidParameterError
from llmopt.report import parameters, runner
from llmopt.report.readme import README

NOTEBOOKS = [p.stem for p in runner.discover()]


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_every_parameter_is_declared_and_its_default_and_smoke_value_allowed(notebook):
    found = parameters.notebook_parameters(notebook)
    specs = parameters.declared(notebook)
    assert set(found) == set(specs), "declare each notebook parameter in llmopt/report/parameters.py (and only those)"
    for name, p in found.items():
        assert specs[name].accepts(p.default), f"{notebook}: the default {name} = {p.default!r} is not allowed"
    assert set(parameters.SMOKE[notebook]) <= set(found)
    parameters.resolve(notebook, {}, smoke=False)  # the defaults pass the cross-parameter checks
    parameters.resolve(notebook, {}, smoke=True)  # so do the smoke settings


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_no_notebook_code_reads_a_smoke_flag(notebook):
    """Smoke settings live in the runner (parameters.SMOKE), not in `if smoke:` blocks of the notebooks."""
    cells = json.loads(parameters.notebook_path(notebook).read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
            assert "smoke" not in names, source
            assert not cell.get("outputs") and cell.get("execution_count") is None, (
                "notebooks are stored without outputs")


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_the_users_value_wins_over_the_smoke_setting(notebook):
    smoke = parameters.SMOKE[notebook]
    defaults = parameters.notebook_parameters(notebook)
    for name, value in smoke.items():
        other = defaults[name].default  # a value the user may give: the default, or anything allowed
        try:
            resolved = parameters.resolve(notebook, {name: other}, smoke=True)
        except InvalidParameterError as exc:  # a combination a cross-parameter rule refuses, said so
            assert "a smoke run sets" in str(exc), exc
            continue
        assert resolved.get(name, defaults[name].default) == other, name
        assert parameters.resolve(notebook, {}, smoke=True).get(name, defaults[name].default) == value


REFUSED = [
    (["00", "-p", "threads=0"], "threads=0", "an integer >= 1"),
    (["00", "-p", "threads=-2"], "threads=-2", "an integer >= 1"),
    (["00", "-p", "foo=1"], "unknown parameter 'foo'", "llmopt params 00"),
    (["00", "-p", "thread=3"], "unknown parameter 'thread'", "did you mean 'threads'"),
    (["00", "-p", "prompt_lengths=[8,16"], "prompt_lengths='[8,16' does not read as a value", "a list of integers"),
    (["00", "-p", "new_tokens=many"], "new_tokens='many' does not read as a value", "an integer >= 1"),
    (["00", "-p", "prompt_lengths=[8, 0]"], "prompt_lengths=[8, 0]", "each >= 1"),
    (["00", "-p", "dtype=fp8"], "dtype='fp8'", "'fp32', 'bf16', 'fp16'"),
    (["00", "--smoke", "-p", "repeats=0"], "repeats=0", "an integer >= 1"),
    (["04", "-p", "memory_limit_prompts=0"], "memory_limit_prompts=0", "a number > 0"),
    (["04", "--smoke", "-p", "scenario_prefix=150"], "scenario_prefix must be one of prefix_lengths",
     "a smoke run sets prefix_lengths"),
    (["02", "-p", "min_new_tokens=20"], "min_new_tokens must not exceed max_new_tokens", "min_new_tokens=20"),
    (["07", "-p", "quantization_bits=6"], "quantization_bits=6", "one of 4, 8"),
    (["03", "-p", "num_layers=2"], "the shipped GGUF file's row needs the whole model", "use_gguf_file=False"),
    (["99"], "no notebook matches", "00_baseline"),
    (["00", "--smoke", "--publish"], "a smoke run is never published", ""),
]


@pytest.mark.parametrize("argv,message,allowed", REFUSED, ids=[" ".join(a) for a, _, _ in REFUSED])
def test_a_refused_parameter_stops_the_run_before_anything_is_written(argv, message, allowed, tmp_path, capsys,
                                                                      monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a notebook ran")

    monkeypatch.setattr(runner, "run_notebook", must_not_run)
    readme = README.read_text()
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports"),
            "--results-dir", str(tmp_path / "results")]
    assert cli.main(["run", *argv, *dirs]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmopt: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err and allowed in err, err
    assert not any(tmp_path.iterdir()), "something was written"
    assert README.read_text() == readme


def test_values_are_typed_by_their_declaration():
    got = parameters.parse_assignments(
        ["prompt_lengths=[8, 16]", "model=/path/to/a checkpoint", "device=cuda:1", "threads=4", "dtype='bf16'"],
        ["00_baseline"])
    assert got == {"prompt_lengths": [8, 16], "model": "/path/to/a checkpoint", "device": "cuda:1", "threads": 4,
                   "dtype": "bf16"}
    assert parameters.parse_assignments(["model=None", "compile_decode=true"], ["01_kv_cache"]) == {
        "model": None, "compile_decode": True}
    assert parameters.parse_assignments(["memory_limit_prompts=2"], ["04_prompt_caching"]) == {
        "memory_limit_prompts": 2}
    with pytest.raises(InvalidParameterError, match="threads=True"):
        parameters.check({"threads": True}, ["00_baseline"])  # a bool is not a count
    with pytest.raises(InvalidParameterError, match="answer_lengths"):
        parameters.check({"answer_lengths": [[128, 32]]}, ["02_batching"])  # low > high


def test_a_parameter_only_some_notebooks_take_goes_to_those():
    assert parameters.parse_assignments(["lookup_ks=[2]"], ["00_baseline", "06_speculative_decoding"]) == {
        "lookup_ks": [2]}
    assert parameters.resolve("00_baseline", {"lookup_ks": [2]}) == {}
    assert parameters.resolve("06_speculative_decoding", {"lookup_ks": [2]}) == {"lookup_ks": [2]}


def test_params_lists_each_parameter_with_its_default_rule_smoke_value_and_help(capsys):
    assert cli.main(["params", "00"]) == 0
    out = capsys.readouterr().out
    default = parameters.notebook_parameters("00_baseline")["prompt_lengths"].default
    assert f"prompt_lengths = {default}   (smoke: [8, 16])" in out
    assert "takes a list of integers, each >= 1 (at least one)" in out
    assert "torch intra-op threads" in out
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "llmopt params" in capsys.readouterr().out


def test_threads_below_one_are_refused_where_they_are_read():
    from llmopt.bench.environment import set_threads

    for bad in (0, -2, 2.5, True, "2"):
        with pytest.raises(InvalidParameterError, match="threads"):
            set_threads(bad)
    before = set_threads(None)  # None: left as it is
    try:
        assert set_threads(1) == 1
    finally:
        set_threads(before)


def test_a_zero_memory_limit_is_refused_not_defaulted():
    from llmopt.bench import prefix_workload

    for bad in (0, -1):
        with pytest.raises(InvalidParameterError, match="max_bytes"):
            prefix_workload.multi_tenant(None, None, requests=1, max_bytes=bad)


def test_the_int4_format_takes_a_group_that_divides_the_widths():
    """07's format section on a model whose widths are not multiples of 64: g32, not a failure."""
    from llmopt.bench import combined
    from llmopt.engine.testing import tiny_pair

    _, model = tiny_pair("llama", seed=2, hidden_size=96, intermediate_size=160)
    quantized = combined.our_format(model, "INT4 g64")  # g64 raised InvalidParameterError here
    assert not any(type(m).__name__ == "Linear" for m in quantized.modules())
    assert {m.group_size for m in quantized.modules()
            if getattr(m, "bits", None) == 4 and hasattr(m, "group_size")} <= {32}


@pytest.mark.notebook
def test_a_smoke_run_keeps_the_users_value(tmp_path):
    suite = runner.run_suite(["00"], {"prompt_lengths": [12]}, smoke=True, runs_dir=tmp_path / "runs")
    assert suite.ok, suite[0].error
    rows = pd.read_csv(suite.run_dir / "results" / "00_baseline.csv")
    assert set(rows.prompt_tokens) == {12}
    # what differs from the notebook's defaults: the user's value and the smoke settings it did not override
    defaults = {name: p.default for name, p in parameters.notebook_parameters("00_baseline").items()}
    expected = {k: v for k, v in {**parameters.SMOKE["00_baseline"], "prompt_lengths": [12]}.items()
                if defaults[k] != v}
    assert json.loads((suite.run_dir / "parameters.json").read_text())["00_baseline"] == expected
    assert expected["prompt_lengths"] == [12] and expected["repeats"] == 1
