"""What makes a plot readable, checked on the matplotlib figure itself: `problems(fig)` lists what a reader
would trip over, so every figure a notebook shows is checked automatically (see `notebook.setup_display`).

The rules, for every Axes that shows data (lines, markers, bars, filled bands, images):

* A numeric axis (its tick labels are numbers) has a label; the label is not a raw column name (an
  underscore and no space, e.g. ``decode_tokens_per_s``) and names its unit, or says it is a ratio, a
  fraction or a count: it holds a unit word or symbol from ``UNIT_SYMBOLS`` / ``UNIT_WORDS`` (s, ms, tok/s,
  tokens, MB, GB/s, x, %, fraction, requests, ...) or a parenthesised part, e.g. ``acceptance (α)``.
  A categorical axis (some tick label is text) needs no label. An axis whose tick labels are all hidden
  (an inner panel of a shared axis) is not checked.
* A numeric axis shows at least two tick labels (one or none: its scale cannot be read; bars at categories
  that are numbers, e.g. one group "32", are exempt), the tick labels of one axis do not overlap each other
  (their drawn extents are compared) and none reads like ``8×10⁰`` (the minor labels a log axis spanning
  less than a decade or two gets).
* Several series need a legend (on the Axes or on the figure): more than one labelled artist, or more than
  one colour among the Axes' lines, among its bars, among its line collections or among its points.
  A legend title is not a raw column name.
* The legend covers no bar and no data point (bar extents and point positions against the legend's box;
  a line segment crossing the legend between two points is not checked).
* A line plot does not have a single x value (every line a dot: there is no trend to see).
"""
from __future__ import annotations

import re

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.category import UnitData
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

UNIT_SYMBOLS = {"s", "ms", "µs", "us", "ns", "min", "h", "B", "kB", "KB", "KiB", "MB", "MiB", "GB", "GiB", "TB",
                "x", "×", "%", "W", "J", "Hz", "MHz", "GHz", "FLOP", "GFLOP", "TFLOP"}
UNIT_WORDS = {"second", "seconds", "minute", "minutes", "hour", "hours", "token", "tokens", "tok", "byte", "bytes",
              "bit", "bits", "request", "requests", "fraction", "ratio", "share", "count", "percent", "times",
              "step", "steps", "pass", "passes", "layer", "layers", "head", "heads", "sample", "samples",
              "round", "rounds", "call", "calls", "words", "characters", "prompts", "users"}
_RAW_NAME = re.compile(r"^\S*_\S*$")
_WORD = re.compile(r"[^\s,;:()\[\]=+*<>]+")
_MATHTEXT = re.compile(r"\\[A-Za-z]+|[${}^\s]")
_NUMBER = re.compile(r"[-+]?[\d.,]*\d[\d.,]*(?:[eE][-+]?\d+)?(?:\*[\d.]+)?[x×%]?")
OVERLAP_PX = 1.0  # tick labels may touch; more than this much shared width (or height) is an overlap


def is_raw_name(label: str) -> bool:
    """A column name as the code spells it (``time_to_first_token_s``), not words a reader reads."""
    return bool(_RAW_NAME.match(label.strip()))


def names_unit(label: str) -> bool:
    """Does `label` say its unit (or that it is a ratio/fraction/count)? A unit word or symbol, or a
    parenthesised part."""
    if re.search(r"\(.+\)|\[.+\]", label):
        return True
    for word in _WORD.findall(label):
        for part in [word, *word.split("/")]:
            if part in UNIT_SYMBOLS or part.lower() in UNIT_WORDS:
                return True
    return False


def _is_number(text: str) -> bool:
    plain = _MATHTEXT.sub("", text).replace("−", "-").replace("×", "*")  # mathtext "8\\times10^{0}" -> "8100"
    return bool(_NUMBER.fullmatch(plain))


def _renderer(fig: Figure):
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _data_lines(ax: Axes) -> list[Line2D]:
    """Lines drawn in data coordinates with at least one point (not axhline/axvline, not legend proxies)."""
    return [line for line in ax.lines if line.get_visible() and line.get_transform() == ax.transData
            and len(line.get_xdata()) > 0]


def _bars(ax: Axes) -> list[Rectangle]:
    """Bars: visible rectangles with an area (seaborn leaves zero-height ones for missing hue levels)."""
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_visible()
            and np.isfinite([p.get_width(), p.get_height()]).all() and p.get_width() * p.get_height() != 0]


def _point_collections(ax: Axes) -> list:
    """Scatter points: collections with offsets, not line collections (hlines) or filled bands."""
    return [c for c in ax.collections if c.get_visible() and not isinstance(c, (LineCollection, PolyCollection))
            and len(c.get_offsets()) > 0]


def shows_data(ax: Axes) -> bool:
    """Does the Axes draw data (not an empty or turned-off panel, not a colorbar)?"""
    if not ax.get_visible() or not ax.axison or hasattr(ax, "_colorbar"):
        return False
    visible = [c for c in ax.collections if c.get_visible()]
    return bool(_data_lines(ax) or _bars(ax) or visible or any(isinstance(i, AxesImage) for i in ax.images))


def _tick_labels(axis) -> list:
    """The tick labels drawn on `axis` (major and minor, inside the view, visible, not empty)."""
    low, high = sorted(axis.get_view_interval())
    tolerance = (high - low) * 1e-9
    labels = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        if not low - tolerance <= tick.get_loc() <= high + tolerance:
            continue
        for label in (tick.label1, tick.label2):
            if label.get_visible() and label.get_text().strip():
                labels.append(label)
    return labels


def _overlapping(labels, renderer) -> list[tuple[str, str]]:
    """Pairs of tick labels whose drawn boxes share more than OVERLAP_PX in both directions."""
    boxes = [(label.get_text(), label.get_window_extent(renderer)) for label in labels]
    pairs = []
    for i, (text_a, a) in enumerate(boxes):
        for text_b, b in boxes[i + 1:]:
            width = min(a.x1, b.x1) - max(a.x0, b.x0)
            height = min(a.y1, b.y1) - max(a.y0, b.y0)
            if width > OVERLAP_PX and height > OVERLAP_PX:
                pairs.append((text_a, text_b))
    return pairs


def _axis_problems(ax: Axes, name: str, renderer) -> list[str]:
    """The label and tick rules, for the x and the y axis of `ax`."""
    found = []
    for letter, axis, label in (("x", ax.xaxis, ax.get_xlabel()), ("y", ax.yaxis, ax.get_ylabel())):
        labels = _tick_labels(axis)
        if not labels:
            continue  # hidden tick labels: the inner panel of a shared axis (or an axis turned off)
        texts = [t.get_text() for t in labels]
        if not all(_is_number(t) for t in texts):
            continue  # categorical: the tick labels say what each position is
        if not label.strip():
            found.append(f"{name}: the {letter} axis has no label (say what it measures and its unit)")
        elif is_raw_name(label):
            found.append(f"{name}: the {letter} axis label {label!r} is a raw column name")
        elif not names_unit(label):
            found.append(f"{name}: the {letter} axis label {label!r} names no unit (e.g. 'seconds', "
                         "'tokens / s', 'MB', '(fraction)', '(x)')")
        if len(set(texts)) < 2 and not isinstance(axis.get_units(), UnitData):  # one bar group ("32") is fine
            found.append(f"{name}: the {letter} axis shows {len(set(texts))} tick label(s), its scale cannot be "
                         "read (set explicit ticks)")
        crowded = [t for t in texts if "\\times10" in t or "×10" in t]
        if crowded:
            found.append(f"{name}: {letter} tick labels in the form a×10^b ({len(crowded)} of them: a log axis's "
                         "minor labels): set explicit ticks with plain labels")
        for a, b in _overlapping(labels, renderer):
            found.append(f"{name}: {letter} tick labels {a!r} and {b!r} overlap")
    return found


def _colours(colors) -> set:
    return {tuple(round(c, 3) for c in to_rgb(colour)) for colour in colors}


def _needs_legend(ax: Axes) -> str | None:
    """Why the Axes needs a legend, or None."""
    lines = _data_lines(ax)
    labelled = [a for a in [*lines, *ax.collections, *ax.containers]
                if a.get_label() and not str(a.get_label()).startswith("_")]
    if len(labelled) > 1:
        return f"{len(labelled)} labelled series"
    groups = {
        "lines": _colours(line.get_color() for line in lines),
        "bars": _colours(bar.get_facecolor() for bar in _bars(ax)),
        "line collections": _colours(c for coll in ax.collections if isinstance(coll, LineCollection)
                                     for c in coll.get_colors()),
        "points": _colours(c for coll in _point_collections(ax) for c in coll.get_facecolors()),
    }
    for kind, colours in groups.items():
        if len(colours) > 1:
            return f"{len(colours)} colours of {kind}"
    return None


def _legends(ax: Axes) -> list:
    legend = ax.get_legend()
    own = [legend] if legend is not None and legend.get_visible() else []
    return own + [leg for leg in ax.figure.legends if leg.get_visible()]


def _covered(ax: Axes, legend, renderer) -> list[str]:
    """Bars and data points of `ax` under `legend`'s box."""
    box = legend.get_window_extent(renderer)
    frame = ax.get_window_extent(renderer)
    found = []
    for bar in _bars(ax):
        extent = bar.get_window_extent(renderer)
        width = min(box.x1, extent.x1, frame.x1) - max(box.x0, extent.x0, frame.x0)
        height = min(box.y1, extent.y1, frame.y1) - max(box.y0, extent.y0, frame.y0)
        if width > 1 and height > 1:
            found.append("a bar")
            break
    points = [line.get_transform().transform(line.get_xydata()) for line in _data_lines(ax)]
    points += [c.get_offset_transform().transform(c.get_offsets()) for c in _point_collections(ax)]
    for xy in points:
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        inside_axes = (xy[:, 0] >= frame.x0) & (xy[:, 0] <= frame.x1) & (xy[:, 1] >= frame.y0) & (xy[:, 1] <= frame.y1)
        under = (xy[:, 0] > box.x0) & (xy[:, 0] < box.x1) & (xy[:, 1] > box.y0) & (xy[:, 1] < box.y1)
        if (inside_axes & under).any():
            found.append("a data point")
            break
    return found


def _single_x(ax: Axes) -> bool:
    """A line plot whose lines all sit at one x value (and no bars: error bars of a single bar are fine)."""
    lines = [line for line in _data_lines(ax) if line.get_linestyle() not in ("None", "", " ")]
    if not lines or _bars(ax):
        return False
    xs = {float(x) for line in lines for x in np.asarray(line.get_xdata(), dtype=float) if np.isfinite(x)}
    return len(xs) == 1


def axes_name(ax: Axes, index: int) -> str:
    title = ax.get_title() or ax.get_title("left") or ax.get_title("right")
    return f"panel {index + 1} ({title!r})" if title else f"panel {index + 1}"


def problems(fig: Figure) -> list[str]:
    """What a reader would trip over in `fig`, one sentence per problem ([] when the figure is readable).
    Draws the figure (on an Agg canvas) to measure its tick labels and legend."""
    renderer = _renderer(fig)
    found = []
    for index, ax in enumerate(fig.axes):
        if not shows_data(ax):
            continue
        name = axes_name(ax, index)
        found += _axis_problems(ax, name, renderer)
        legends = _legends(ax)
        reason = _needs_legend(ax)
        if reason and not legends:
            found.append(f"{name}: {reason} but no legend says which is which")
        for legend in legends:
            title = legend.get_title().get_text()
            if title and is_raw_name(title):
                found.append(f"{name}: the legend title {title!r} is a raw column name")
            for what in _covered(ax, legend, renderer):
                found.append(f"{name}: the legend covers {what} (move it, e.g. loc= or bbox_to_anchor=)")
        if _single_x(ax):
            found.append(f"{name}: a line plot with a single x value (nothing to compare along x)")
    return list(dict.fromkeys(found))
