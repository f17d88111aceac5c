"""The plot checks (llmopt.report.figures) on small hand-made figures: each rule fires on a bad plot and stays
quiet on the fixed one; and the IPython hook runs before the inline backend's flush and shows a visible block."""
from __future__ import annotations

import matplotlib
import pytest
from matplotlib.figure import Figure

from llmopt.report import figures, notebook

matplotlib.use("Agg")


def axes(width=5, height=3):
    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def good_line():
    fig, ax = axes()
    ax.plot([1, 2, 4], [10, 20, 30], marker="o")
    ax.set(xlabel="prompt tokens", ylabel="decode throughput (tok/s)")
    return fig, ax


def matching(fig, text: str) -> list[str]:
    return [p for p in figures.problems(fig) if text in p]


def test_a_labelled_plot_has_no_problems():
    fig, _ = good_line()
    assert figures.problems(fig) == []


@pytest.mark.parametrize("label, problem", [
    ("", "has no label"),
    ("decode_tokens_per_s", "raw column name"),
    ("throughput", "names no unit"),
])
def test_numeric_axis_needs_a_readable_label_with_a_unit(label, problem):
    fig, ax = good_line()
    ax.set_ylabel(label)
    assert matching(fig, problem) and "the y axis" in matching(fig, problem)[0]


@pytest.mark.parametrize("label", ["seconds", "tokens / s", "MB", "speedup (x)", "share of tokens, %",
                                   "acceptance α (fraction)", "requests", "time to first token [ms]"])
def test_labels_with_a_unit_pass(label):
    fig, ax = good_line()
    ax.set_ylabel(label)
    assert figures.problems(fig) == []


def test_unit_words_and_raw_names():
    assert figures.names_unit("latency p50 (s)") and figures.names_unit("tok/s") and figures.names_unit("3 x")
    assert not figures.names_unit("latency") and not figures.names_unit("speedup")
    assert figures.is_raw_name("time_to_first_token_s") and not figures.is_raw_name("time to first_token (s)")


def test_categorical_axis_needs_no_label():
    fig, ax = axes()
    ax.bar(["fp32", "int8", "int4"], [10, 20, 30])
    ax.set(ylabel="tokens / s")
    assert figures.problems(fig) == []
    ax.set_ylabel("")
    assert matching(fig, "the y axis has no label")


def test_numbers_as_categories_still_need_a_unit():
    fig, ax = axes()
    ax.bar(["16", "64", "256"], [1, 2, 3])
    ax.set(ylabel="seconds")
    assert matching(fig, "the x axis has no label")
    ax.set_xlabel("prompt tokens")
    assert figures.problems(fig) == []


def test_one_numeric_category_is_not_an_unreadable_scale():
    fig, ax = axes()
    ax.bar(["32"], [1])
    ax.set(xlabel="prompt tokens", ylabel="seconds")
    assert figures.problems(fig) == []


def test_several_series_need_a_legend():
    fig, ax = good_line()
    ax.plot([1, 2, 4], [5, 6, 7], marker="o")  # a second colour, no labels: seaborn's hue lines look like this
    assert matching(fig, "no legend")
    ax.lines[0].set_label("cached")
    ax.lines[1].set_label("uncached")
    assert matching(fig, "2 labelled series but no legend")
    ax.legend(loc="upper left")
    assert figures.problems(fig) == []


def test_a_figure_legend_counts():
    fig, ax = good_line()
    ax.plot([1, 2, 4], [5, 6, 7], marker="o")
    fig.legend(["a", "b"], loc="outside right upper")
    assert not matching(fig, "no legend")


def test_bars_of_several_colours_need_a_legend():
    fig, ax = axes()
    ax.bar([0, 1], [3, 4], color="tab:blue")
    ax.bar([0.4, 1.4], [2, 5], color="tab:orange")
    ax.set(xlabel="prompt tokens", ylabel="seconds")
    assert matching(fig, "2 colours of bars")


def test_a_reference_line_is_not_a_series():
    fig, ax = good_line()
    ax.axhline(15, color="black")
    assert figures.problems(fig) == []


def test_legend_title_is_not_a_raw_name():
    fig, ax = good_line()
    ax.plot([1, 2, 4], [5, 6, 7], marker="o")
    ax.legend(["a", "b"], title="prefix_hit", loc="center left", bbox_to_anchor=(1, 0.5))
    assert matching(fig, "legend title 'prefix_hit'")
    ax.get_legend().set_title("prefix hit")
    assert figures.problems(fig) == []


def test_legend_covering_a_bar():
    fig, ax = axes()
    ax.bar([0, 1, 2], [10, 10, 10], label="time")
    ax.set(xlabel="round (count)", ylabel="seconds", ylim=(0, 11))
    ax.legend(loc="center")
    assert matching(fig, "the legend covers a bar")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    assert figures.problems(fig) == []


def test_legend_covering_a_point():
    fig, ax = good_line()
    ax.plot([1, 2.5, 4], [12, 20, 28], marker="o")
    ax.legend(["a", "b"], loc="center")  # (2.5, 20) sits at the centre
    assert matching(fig, "the legend covers a data point")
    ax.legend(["a", "b"], loc="lower right")
    assert figures.problems(fig) == []


def test_overlapping_tick_labels():
    fig, ax = good_line()
    ax.set_xticks([1, 1.05, 4], ["1000000", "1050000", "4000000"])
    assert matching(fig, "x tick labels '1000000' and '1050000' overlap")
    ax.set_xticks([1, 2, 4], ["1", "2", "4"])
    assert figures.problems(fig) == []


def test_log_axis_with_one_tick_label():
    fig, ax = axes()
    ax.plot([20, 30, 40], [1, 2, 3], marker="o")
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="seconds")
    ax.set_xticks([30], ["30"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    assert matching(fig, "the x axis shows 1 tick label")
    ax.set_xticks([20, 30, 40], ["20", "30", "40"])
    assert figures.problems(fig) == []


def test_a_line_plot_with_one_x_value():
    fig, ax = axes()
    ax.plot([2.0], [1.0], marker="o")
    ax.plot([2.0], [3.0], marker="o")
    ax.legend(["a", "b"], loc="upper left", bbox_to_anchor=(1, 1))
    ax.set(xlabel="arrival rate (requests / s)", ylabel="seconds")
    assert matching(fig, "single x value")
    ax.lines[0].set_data([1.0, 2.0], [1.0, 2.0])
    assert not matching(fig, "single x value")


def test_an_empty_panel_is_not_checked():
    fig = Figure()
    fig.add_subplot(1, 2, 1).plot([1, 2], [1, 2])
    fig.add_subplot(1, 2, 2).axis("off")
    assert [p.split(":")[0] for p in figures.problems(fig)] == ["panel 1", "panel 1"]  # the x and y labels


class Events:
    def __init__(self):
        self.callbacks = {"post_execute": []}


class Shell:
    def __init__(self):
        self.events = Events()


def test_the_check_runs_before_the_inline_flush_and_once():
    shell = Shell()

    def flush_figures():
        pass

    shell.events.callbacks["post_execute"].append(flush_figures)
    notebook.register_figure_check(shell)
    notebook.register_figure_check(shell)
    assert shell.events.callbacks["post_execute"] == [notebook.check_figures, flush_figures]


def test_the_problem_block_is_visible_html():
    block = notebook.problem_block({"figure 1": ["panel 1: the x axis has no label <b>"]})
    assert f'class="{notebook.PROBLEM_CLASS}"' in block["text/html"]
    assert "&lt;b&gt;" in block["text/html"] and "the x axis has no label" in block["text/plain"]


def test_check_figures_shows_a_block_for_open_figures(monkeypatch):
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(notebook, "display", lambda bundle, raw: shown.append(bundle))
    plt.close("all")
    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2])
    try:
        notebook.check_figures()
        assert len(shown) == 1 and "the y axis has no label" in shown[0]["text/html"]
        ax.set(xlabel="tokens", ylabel="seconds")
        shown.clear()
        notebook.check_figures()
        assert shown == []
    finally:
        plt.close(fig)


def test_log_axis_minor_labels_in_scientific_form():
    fig, ax = axes()
    ax.plot([8, 16], [1, 2], marker="o")
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="seconds")
    assert matching(fig, "x tick labels in the form a×10^b")
    ax.set_xticks([8, 16], ["8", "16"])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    assert figures.problems(fig) == []
