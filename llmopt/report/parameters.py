"""Every notebook's parameters, declared once: what each one takes, checked before anything runs.

The names, defaults and help come from each notebook's cell tagged "parameters" (`notebook_parameters`); what a
value may be (type, lower bound, allowed values) is declared here, in `DECLARED`, keyed by notebook and name. A
test checks that the two cover each other, so a new notebook parameter without a declaration fails it.

`resolve` turns the user's values (`-p name=value`, parsed by `parse_assignments`) and a smoke run's settings
(`SMOKE`, under the user's values: the user wins) into the values each notebook gets, or raises one
`InvalidParameterError` naming the parameter and what it allows. Nothing is silently changed: a value is taken or
refused.
"""
from __future__ import annotations

import ast
import difflib
import io
import json
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

from ..engine.shapes import PREFIX, SHAPES
from ..errors import InvalidParameterError
from ..paths import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

_MISSING = object()


@dataclass(frozen=True)
class Param:
    """What one parameter takes.

    kind: "int" | "float" (an int is taken too) | "bool" | "str" | "list[int]" | "list[float]" | "list[str]" |
    "list[pair]" (a list of [low, high] integer pairs, low <= high).
    min / above: every number (or each number of a list) is >= min / > above. choices: the allowed values (of the
    value, or of each item of a list). pattern: a regular expression a string matches whole.
    optional: None is allowed (its meaning is in the notebook's help). nonempty: a list needs one item at least."""
    kind: str
    min: float | None = None
    above: float | None = None
    choices: tuple = ()
    pattern: str | None = None
    optional: bool = False
    nonempty: bool = False
    text: str = ""  # what it takes in words, where the rule alone reads badly (a pattern)

    def describe(self) -> str:
        """What this parameter allows, in words (for error messages and `llmopt params`)."""
        if self.text:
            return self.text
        item = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
                "list[int]": "a list of integers", "list[float]": "a list of numbers",
                "list[str]": "a list of strings", "list[pair]": "a list of [low, high] integer pairs"}[self.kind]
        bounds = []
        if self.min is not None:
            bounds.append(f">= {self.min:g}")
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.choices:
            listed = ", ".join(repr(c) for c in self.choices)
            text = f"one of {listed}" if not self.kind.startswith("list") else f"{item} from {listed}"
        elif self.pattern:
            text = f"{item} matching {self.pattern}"
        else:
            text = item + (f" {' and '.join(bounds)}" if bounds and not self.kind.startswith("list") else "")
            if bounds and self.kind.startswith("list"):
                text += f", each {' and '.join(bounds)}"
        if self.nonempty:
            text += " (at least one)"
        if self.optional:
            text += ", or None"
        return text

    def _number_ok(self, value) -> bool:
        return (self.min is None or value >= self.min) and (self.above is None or value > self.above)

    def _item_ok(self, kind: str, value) -> bool:
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and self._number_ok(value)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and self._number_ok(value)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str) and (not self.pattern or re.fullmatch(self.pattern, value) is not None)
        elif kind == "pair":
            ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(self._item_ok("int", v) for v in value)
                  and value[0] <= value[1])
        else:
            raise AssertionError(kind)
        return ok and (not self.choices or value in self.choices)

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind.startswith("list["):
            if not isinstance(value, (list, tuple)) or (self.nonempty and not value):
                return False
            return all(self._item_ok(self.kind[5:-1], v) for v in value)
        return self._item_ok(self.kind, value)

    def parse(self, text: str):
        """A value from the command line's text: a Python literal; a string may also be written bare (a path,
        `cuda`); a bool also as true / false. Raises ValueError when the text does not read as a value."""
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = _MISSING
        if self.kind == "str":
            if value is None or isinstance(value, str):
                return value
            return text  # a bare string: a model path, `cuda`
        if self.kind == "bool" and value is _MISSING and text.strip().lower() in ("true", "false"):
            return text.strip().lower() == "true"
        if value is _MISSING:
            raise ValueError(text)
        return list(value) if isinstance(value, tuple) else value


def _int(minimum: int = 1, **kw) -> Param:
    return Param("int", min=minimum, **kw)


def _ints(minimum: int = 1, nonempty: bool = True, **kw) -> Param:
    return Param("list[int]", min=minimum, nonempty=nonempty, **kw)


def _flag() -> Param:
    return Param("bool")


DTYPES = ("fp32", "bf16", "fp16")
COMMON = {
    "model": Param("str", optional=True, pattern=(  # anything, but a shape must be a known one (checked up front)
        rf"(?is)(?!\s*{PREFIX}).*|\s*{PREFIX}({'|'.join(re.escape(k) for k in SHAPES)})(@\d+)?\s*"), text=(
        "a checkpoint directory, a cached Hugging Face id (owner/name), None for the default model, or "
        f"{', '.join(PREFIX + k for k in SHAPES)} (that architecture with seeded random weights: speed and memory "
        "only)")),
    "device": Param("str", pattern=r"cpu|cuda(:\d+)?|mps", text="'cpu', 'cuda', 'cuda:N' or 'mps'"),
    "dtype": Param("str", choices=DTYPES),
    "threads": _int(1),
}

# Per notebook, every parameter of its "parameters" cell besides COMMON's. Counts, lengths, repeats and limits that
# mean nothing at zero start at 1; warm-up rounds and seeds may be 0.
DECLARED: dict[str, dict[str, Param]] = {
    "00_baseline": {
        "prompt_lengths": _ints(), "new_tokens": _int(), "repeats": _int(), "warmup": _int(0),
    },
    "01_kv_cache": {
        "prompt_lengths": _ints(), "new_tokens": _int(), "repeats": _int(), "warmup": _int(0),
        "position_tokens": _int(2), "position_prompt_tokens": _int(),
        "compare_dtypes": Param("list[str]", choices=DTYPES, nonempty=True), "compare_prompt_tokens": _int(),
        "compare_new_tokens": _int(), "compare_repeats": _int(), "compile_decode": _flag(),
        "bandwidth_probe_mib": _int(), "memory_prompt_tokens": _int(), "memory_new_tokens": _int(),
    },
    "02_batching": {
        "seed": _int(0), "n_requests": _int(), "single_requests": _int(), "min_new_tokens": _int(),
        "max_new_tokens": _int(), "max_prompt_tokens": _int(), "concurrencies": _ints(), "timeout_ms": Param(
            "float", min=0), "load_factors": Param("list[float]", above=0), "poisson_requests": _int(),
        "poisson_max_batch": _int(), "burst_repeats": _int(), "repeat_concurrencies": _ints(optional=True),
        "repeats": _int(), "answer_lengths": Param("list[pair]", min=1), "answer_requests": _int(),
        "answer_repeats": _int(), "compare_transformers": _flag(),
    },
    "03_quantization": {
        "num_layers": _int(optional=True),
        "rtn_group_sizes": _ints(nonempty=False), "gptq_group_sizes": _ints(nonempty=False),
        "gptq_act_order": _flag(), "include_lm_head": _flag(), "lm_head_bits": Param("int", choices=(4, 8)),
        "use_gguf_file": _flag(), "gguf_kinds": Param("list[str]", choices=("Q8_0", "Q4_0", "Q4_1")),
        "pytorch_kernel_rows": _flag(), "engine": Param("str", choices=("fused", "pytorch")),
        "pytorch_engine_rows": _flag(), "calibration_samples": _int(), "calibration_length": _int(2),
        "eval_tokens": _int(2), "eval_window": _int(2), "prompt_tokens": _int(), "new_tokens": _int(),
        "repeats": _int(), "warmup": _int(0), "bandwidth_probe_mib": _int(),
    },
    "04_prompt_caching": {
        "prefix_lengths": _ints(), "scenario_prefix": _int(), "new_tokens": _int(), "repeats": _int(),
        "warmup": _int(0), "requests": _int(), "tenants": _int(), "users": _int(), "zipf_s": Param("float", min=0),
        "memory_limit_prompts": Param("float", above=0), "ttl_s": Param("float", above=0),
    },
    "05_flash_attention": {
        "backends": Param("list[str]", choices=("naive", "tiled", "sdpa", "flash_attn"), optional=True,
                          nonempty=True),
        "op_lengths": _ints(), "op_repeats": _int(), "max_seconds_per_case": Param("float", above=0),
        "max_projected_gib": Param("float", above=0), "model_lengths": _ints(nonempty=False), "new_tokens": _int(),
        "model_repeats": _int(), "warmup": _int(0),
    },
    "06_speculative_decoding": {
        "workloads": Param("list[str]", choices=("open-ended", "repeat", "summarize"), nonempty=True),
        "lookup_ks": _ints(nonempty=False), "model_ks": _ints(nonempty=False), "early_exit_ks": _ints(nonempty=False),
        "self_quantized": Param("str", choices=("int8", "int4", "bf16", "fp16")), "early_exit_layers": _int(),
        "draft_model": Param("str", optional=True), "new_tokens": _int(), "repeats": _int(),
    },
    "07_combined": {
        "requests": _int(), "new_tokens": _int(), "repeats": _int(), "warmup": _int(0), "speculative_k": _int(),
        "quantization_bits": Param("int", choices=(4, 8)), "batch_concurrency": _int(), "batch_new_tokens": _int(),
        "peers": _flag(), "llama_cpp": _flag(), "passage_tokens": _int(), "system_tokens": _int(),
        "demonstration_tokens": _int(), "format_prompt_tokens": _int(), "format_new_tokens": _int(),
        "reference_results": Param("str", optional=True), "shrink_reproduction": _flag(),
        "equivalence_margin": Param("float", above=0),
    },
}

# Checks across parameters of one notebook: (names, test on the values, what it requires).
CROSS_CHECKS: dict[str, list[tuple[tuple[str, ...], object, str]]] = {
    "02_batching": [(("min_new_tokens", "max_new_tokens"), lambda p: p["min_new_tokens"] <= p["max_new_tokens"],
                     "min_new_tokens must not exceed max_new_tokens")],
    "03_quantization": [(("eval_window", "eval_tokens"), lambda p: p["eval_window"] <= p["eval_tokens"],
                         "eval_window must not exceed eval_tokens"),
                        (("num_layers", "use_gguf_file"), lambda p: p["num_layers"] is None or not p["use_gguf_file"],
                         "the shipped GGUF file's row needs the whole model: num_layers=None or use_gguf_file=False")],
    "04_prompt_caching": [(("scenario_prefix", "prefix_lengths"),
                           lambda p: p["scenario_prefix"] in p["prefix_lengths"],
                           "scenario_prefix must be one of prefix_lengths")],
}

# A smoke run's settings (what the tests run): every code path in seconds, meaningless numbers. Applied under the
# user's `-p` values.
SMOKE: dict[str, dict[str, object]] = {
    "00_baseline": {"prompt_lengths": [8, 16], "new_tokens": 4, "repeats": 1, "warmup": 0},
    "01_kv_cache": {"prompt_lengths": [8, 16], "new_tokens": 4, "repeats": 1, "warmup": 0, "position_tokens": 8,
                    "position_prompt_tokens": 8, "compare_dtypes": ["fp32"], "compare_prompt_tokens": 8,
                    "compare_new_tokens": 4, "compare_repeats": 1, "memory_prompt_tokens": 16,
                    "bandwidth_probe_mib": 32},
    "02_batching": {"n_requests": 3, "min_new_tokens": 2, "max_new_tokens": 3,
                    "max_prompt_tokens": 24, "concurrencies": [1, 2], "load_factors": [8], "poisson_requests": 3,
                    "repeats": 1, "burst_repeats": 1, "answer_lengths": [[3, 4]], "answer_requests": 2,
                    "answer_repeats": 1},
    "03_quantization": {"num_layers": 2, "rtn_group_sizes": [32], "gptq_group_sizes": [32], "gguf_kinds": ["Q4_0"],
                        "use_gguf_file": False, "include_lm_head": False, "pytorch_kernel_rows": False,
                        "calibration_samples": 2, "calibration_length": 32, "eval_tokens": 64, "eval_window": 32,
                        "prompt_tokens": 8, "new_tokens": 4, "repeats": 1, "warmup": 0, "bandwidth_probe_mib": 32},
    "04_prompt_caching": {"prefix_lengths": [250], "new_tokens": 2, "repeats": 1, "warmup": 0, "requests": 6,
                          "tenants": 2},
    "05_flash_attention": {"op_lengths": [64, 256], "op_repeats": 1, "model_lengths": [32], "new_tokens": 3,
                           "model_repeats": 1, "warmup": 0},
    "06_speculative_decoding": {"workloads": ["repeat"], "lookup_ks": [3], "model_ks": [2], "early_exit_ks": [2],
                                "new_tokens": 6, "repeats": 1},
    "07_combined": {"new_tokens": 3, "repeats": 1, "warmup": 0, "batch_concurrency": 2,
                    "batch_new_tokens": 2, "passage_tokens": 12, "system_tokens": 8, "demonstration_tokens": 10,
                    "format_prompt_tokens": 16, "format_new_tokens": 3, "llama_cpp": False,
                    "shrink_reproduction": True},
}


@dataclass(frozen=True)
class NotebookParameter:
    """One assignment of a notebook's parameters cell: its default and the comment beside it (the help)."""
    name: str
    default: object
    help: str
    source: str  # the default as written in the cell


def notebook_path(name: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    return Path(notebooks_dir) / f"{name}.ipynb"


def parameters_cell(notebook) -> str:
    """The source of the notebook's cell tagged "parameters"."""
    cells = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise InvalidParameterError(f"a notebook needs exactly one cell tagged 'parameters', found {len(cells)}")
    return cells[0]["source"]


def read_parameters_cell(source: str) -> dict[str, NotebookParameter]:
    """Each `name = literal  # help` of a parameters cell, in order; a comment line right below an assignment
    continues its help."""
    comments: dict[int, str] = {}
    comment_only: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            comments[row] = token.string.lstrip("#").strip()
            if not token.line[:token.start[1]].strip():
                comment_only.add(row)
    out: dict[str, NotebookParameter] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise InvalidParameterError(f"the parameters cell holds something other than `name = value`: "
                                        f"{ast.get_source_segment(source, node)!r}")
        lines = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
        row = node.end_lineno + 1
        while row in comment_only:
            lines.append(comments[row])
            row += 1
        name = node.targets[0].id
        out[name] = NotebookParameter(name, ast.literal_eval(node.value), " ".join(lines),
                                      ast.get_source_segment(source, node.value))
    return out


_CACHE: dict[tuple[Path, float], dict[str, NotebookParameter]] = {}


def notebook_parameters(name: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, NotebookParameter]:
    """The parameters of notebook `name` (e.g. "00_baseline") as its parameters cell declares them."""
    path = notebook_path(name, notebooks_dir)
    key = (path, path.stat().st_mtime)
    if key not in _CACHE:  # the JSON as stored (nbformat's schema validation costs a second a notebook)
        cells = json.loads(path.read_text())["cells"]
        notebook = {"cells": [{**c, "source": "".join(c["source"]) if isinstance(c["source"], list) else c["source"]}
                              for c in cells]}
        _CACHE[key] = read_parameters_cell(parameters_cell(notebook))
    return _CACHE[key]


def declared(name: str) -> dict[str, Param]:
    """What each parameter of notebook `name` takes."""
    if name not in DECLARED:
        raise InvalidParameterError(f"notebook {name} has no parameter declarations in llmopt/report/parameters.py")
    return {**COMMON, **DECLARED[name]}


def _unknown(name: str, notebooks: list[str]) -> InvalidParameterError:
    known = sorted({p for nb in notebooks for p in declared(nb)})
    close = difflib.get_close_matches(name, known, n=1)
    where = notebooks[0] if len(notebooks) == 1 else f"any of {', '.join(notebooks)}"
    return InvalidParameterError(
        f"unknown parameter {name!r}: not a parameter of {where}" + (f" (did you mean {close[0]!r}?)" if close else "")
        + f"; `llmopt params {' '.join(n[:2] for n in notebooks)}` lists them")


def _refused(notebook: str, name: str, value, spec: Param, why: str = "") -> InvalidParameterError:
    return InvalidParameterError(f"{notebook}: parameter {name}={value!r} {why or 'is not allowed'}: "
                                 f"{name} takes {spec.describe()}")


def parse_assignments(texts: list[str], notebooks: list[str]) -> dict[str, object]:
    """`name=value` texts (the command line's `-p`) as typed values, checked against the notebooks that take them.
    Raises InvalidParameterError for a malformed assignment, an unknown name, a value that does not read as what
    the parameter takes (a list not closed, a word for a number) or one out of its range."""
    out: dict[str, object] = {}
    for text in texts:
        if "=" not in text:
            raise InvalidParameterError(f"parameter {text!r} must look like name=value")
        name, raw = (part.strip() for part in text.split("=", 1))
        takers = [nb for nb in notebooks if name in declared(nb)]
        if not takers:
            raise _unknown(name, notebooks)
        values = []
        for nb in takers:
            spec = declared(nb)[name]
            try:
                values.append(spec.parse(raw))
            except ValueError:
                raise _refused(nb, name, raw, spec, "does not read as a value") from None
        out[name] = values[0]
    check(out, notebooks)
    return out


def check(parameters: dict, notebooks: list[str]) -> None:
    """Refuse unknown names and values out of range (for values given as Python objects, e.g. by `run_suite`)."""
    for name, value in parameters.items():
        takers = [nb for nb in notebooks if name in declared(nb)]
        if not takers:
            raise _unknown(name, notebooks)
        for nb in takers:
            spec = declared(nb)[name]
            if not spec.accepts(value):
                raise _refused(nb, name, value, spec)


def resolve(notebook: str, user: dict, smoke: bool = False, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict:
    """The values notebook `notebook` gets, differing from its defaults: a smoke run's settings, then the user's
    values (those this notebook takes) over them. Checks each value and the notebook's cross-parameter rules on the
    values it will run with."""
    specs = declared(notebook)
    given = {**(SMOKE.get(notebook, {}) if smoke else {}), **{k: v for k, v in user.items() if k in specs}}
    for name, value in given.items():
        if name not in specs:
            raise _unknown(name, [notebook])
        if not specs[name].accepts(value):
            raise _refused(notebook, name, value, specs[name])
    defaults = {name: p.default for name, p in notebook_parameters(notebook, notebooks_dir).items()}
    effective = {**defaults, **given}
    for names, test, requirement in CROSS_CHECKS.get(notebook, []):
        if not test(effective):
            values = ", ".join(f"{n}={effective[n]!r}" for n in names)
            set_by_smoke = [n for n in names if smoke and n in SMOKE.get(notebook, {}) and n not in user]
            note = f" (a smoke run sets {', '.join(set_by_smoke)}; pass it with -p)" if set_by_smoke else ""
            raise InvalidParameterError(f"{notebook}: {requirement}; got {values}{note}")
    return {name: value for name, value in given.items() if value != defaults.get(name, _MISSING)}


def describe_notebook(name: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> str:
    """`llmopt params NAME`: each parameter with its default, what it takes, its smoke value and its help."""
    specs = declared(name)
    smoke = SMOKE.get(name, {})
    lines = [f"{name}:"]
    for parameter in notebook_parameters(name, notebooks_dir).values():
        spec = specs.get(parameter.name)
        lines.append(f"  {parameter.name} = {parameter.source}" + (f"   (smoke: {smoke[parameter.name]!r})"
                                                                   if parameter.name in smoke else ""))
        lines.append(f"      takes {spec.describe() if spec else '(undeclared)'}")
        if parameter.help:
            lines.append(f"      {parameter.help}")
    return "\n".join(lines)
