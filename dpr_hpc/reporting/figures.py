"""The report's figures, drawn headless (matplotlib's Agg backend) to PNG files.

Each function takes tidy data that the report computed from the records and a path; none of
them reads records or decides what a figure means, so the report owns the numbers and this
module only their drawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: compute nodes and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110


@dataclass(frozen=True)
class Series:
    """One line of a metric-vs-size figure: a family's cells, each with every repeat's value."""

    label: str
    sizes: list[int]
    repeats: list[list[float]]  # per size, the repeat values (already relative where relative)


def metric_vs_size(series: Sequence[Series], path: Path, title: str, ylabel: str, baseline_label: str | None) -> Path:
    """One line per family through the cells' medians, each repeat a point around it (jittered
    sideways so repeats with one value stay visible), and the baseline's 1.0 where relative."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for number, line in enumerate(series):
        color = f"C{number % 10}"
        medians = [float(np.median(values)) for values in line.repeats]
        ax.plot(line.sizes, medians, marker="o", color=color, label=line.label)
        for size, values in zip(line.sizes, line.repeats):
            jitter = np.linspace(-0.015, 0.015, len(values)) * size if len(values) > 1 else np.zeros(1)
            ax.scatter(np.asarray(size) + jitter, values, s=14, color=color, alpha=0.55, edgecolors="none")
    if baseline_label:
        ax.axhline(1.0, color="red", linestyle=":", linewidth=1.2, label=f"{baseline_label} = 1")
    ax.set_xlabel("embedding size")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def token_lengths(lengths: dict[str, np.ndarray], max_length: int, path: Path, title: str) -> Path:
    """Density of passage token lengths per tokenizer and the cut-off as a red line. Its note
    (the share truncated, what the lengths can and cannot tell) is the report's text under the
    figure, not drawn into it, so the HTML report shows it once."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    top = max(int(max(v.max() for v in lengths.values())) if lengths else max_length, max_length)
    bins = np.arange(0, top + 2) if top <= 128 else np.linspace(0, top + 1, 129)
    for number, (label, values) in enumerate(lengths.items()):
        ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.4, color=f"C{number % 10}", label=f"{label} ({len(values)} passages)")
    ax.axvline(max_length, color="red", linestyle="--", linewidth=1.2, label=f"max_length = {max_length}")
    ax.set_xlabel("passage length (tokens, title and text)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


@dataclass(frozen=True)
class NodePoints:
    """One node's timing repeats, each as a ratio to its cell's median, by metric."""

    label: str  # node and hardware
    ratios: dict[str, list[float]]


def node_variance(nodes: Sequence[NodePoints], factor: float, path: Path) -> Path:
    """Every timing repeat as a ratio to its cell's median, one column per node, a bar at each
    node's median, and the flagging band [1/factor, factor]."""
    metrics = sorted({m for node in nodes for m in node.ratios})
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(nodes) + 2), 4.2))
    width = 0.8 / max(1, len(metrics))
    for m_number, metric in enumerate(metrics):
        for n_number, node in enumerate(nodes):
            values = node.ratios.get(metric, [])
            if not values:
                continue
            x = n_number - 0.4 + width * (m_number + 0.5)
            xs = x + np.linspace(-width / 4, width / 4, len(values)) if len(values) > 1 else [x]
            ax.scatter(xs, values, s=16, color=f"C{m_number}", alpha=0.7, label=metric if n_number == 0 or metric not in ax.get_legend_handles_labels()[1] else None)
            ax.hlines(float(np.median(values)), x - width / 2, x + width / 2, color=f"C{m_number}", linewidth=2)
    for bound in (factor, 1.0 / factor):
        ax.axhline(bound, color="red", linestyle=":", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(nodes)), [n.label for n in nodes], fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("node (hardware)")
    ax.set_ylabel("timing / its cell's median (log)")
    ax.set_title(f"Timing repeats by node (bars: node medians; dotted: {factor:g}x flag)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
