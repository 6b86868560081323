"""What every PNG figure of the report is drawn with: matplotlib's object API on the Agg canvas (no pyplot, no
global figure state), a panel grid, one legend under the panels, titles wrapped to the figure's width, and the
marker of each SAE source kind (``saex.report.cells.SOURCE_MARKS``); colours come from the report's one palette
(``saex.report.cells.source_colours`` / ``scored_colours``), shared with the site's plotly figures."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from saex.report.cells import SOURCE_MARKS, Key, source_kind

DPI = 120
TITLE_CHARS_PER_INCH = 9  # characters of a 13 pt title per inch of figure width (wrapped beyond)
MAX_COLUMNS = 4
REFERENCE_STYLES = {  # label -> line style of the horizontal reference lines
    "original on M": dict(color="0.55", linestyle="-.", linewidth=1.2),
    "original on M_c": dict(color="black", linestyle="--", linewidth=1.4),
    "retrained on M_c": dict(color="black", linestyle=":", linewidth=1.8),
}
SHAPE_ONLY = dict(color="black", markerfacecolor="none")  # a legend entry that stands for a marker, not a colour


class NoData(Exception):
    """The results hold nothing this figure can show; the message says what is missing."""


def grid(n: int, *, width: float = 4.4, height: float = 3.5) -> tuple[Figure, list[Axes]]:
    cols = min(MAX_COLUMNS, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows + 1.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def describe(key: Key, many_models: bool) -> str:
    model, hook, sae = key
    return f"{hook}, SAE {sae}" + (f", {model}" if many_models else "")


def legend(fig: Figure, handles: list) -> None:
    """One legend under the panels, with as many columns as fit the figure's width (nothing clipped)."""
    widest = max(len(h.get_label()) for h in handles) * 0.085 + 0.9  # inches: text at 10 pt plus the marker
    ncols = max(1, min(len(handles), int(fig.get_figwidth() // widest)))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)


def save(fig: Figure, path: Path) -> Path:
    """Save as PNG, the title wrapped to the figure's width first so that no title is cut off."""
    title = fig.get_suptitle()
    if title:
        fig.suptitle(textwrap.fill(title, width=max(30, int(fig.get_figwidth() * TITLE_CHARS_PER_INCH))), fontsize=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def marker(source: str) -> str:
    """The matplotlib marker of an SAE source (``P`` for a kind without one)."""
    return SOURCE_MARKS.get(source_kind(source), ("P", ""))[0]


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks to label, as plain numbers (0.01, 20, 300; not 2×10^1); over more
    than a decade, of the digits between the decades only 2 and 5 (their labels would run into each other)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        if x <= 0 or not super().__call__(x, pos):
            return ""
        digit = round(x / 10 ** math.floor(math.log10(x) + 1e-9))
        low, high = sorted(self.axis.get_view_interval()) if self.axis else (x, x)
        if digit not in (1, 2, 5) and low > 0 and high / low > 10:
            return ""
        return f"{x:g}"


def plain_log_ticks(axis: Axis) -> None:
    """A log axis labelled with plain numbers: the decades, and the digits between where the axis spans too little
    to show more than one or two decades."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
