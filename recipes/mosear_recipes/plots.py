"""The recipes' figures: the loss curve of a training run and the score bars of an evaluation (matplotlib, no
display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRICS = {"reasoning": ("accuracy", "recall", "average"), "recognition": ("accuracy", "weighted_f1", "uar", "war")}
HEADERS = {"accuracy": "Acc.", "recall": "Rec.", "average": "Avg.", "weighted_f1": "W-F1", "uar": "UAR", "war": "WAR"}
SUBSET_TITLES = {
    "video_aligned": "Video-Aligned",
    "audio_aligned": "Audio-Aligned",
    "consistent": "Consistent",
    "overall": "Overall",
}


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_loss_curve(log_history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """PNG of the training loss (``loss``) and validation loss (``eval_loss``) of Trainer's ``log_history`` against
    the optimizer step; a series with no entries is left out (and said so in the title)."""
    series = {
        key: [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        for key in ("loss", "eval_loss")
    }
    figure = _figure(6.0, 3.6)
    axes = figure.add_subplot()
    labels = {"loss": "training", "eval_loss": "validation"}
    for key, points in series.items():
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=labels[key])
    absent = [labels[key] for key, points in series.items() if not points]
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title("loss" + (f" (no {' or '.join(absent)} loss logged)" if absent else ""))
    if len(absent) < len(series):
        axes.legend()
    axes.grid(alpha=0.3)
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def plot_scores(rows: Sequence[tuple[str, Mapping[str, object]]], path: str | Path) -> None:
    """PNG bar chart: one panel per metric, subsets on the x axis, one bar per ``(name, result)``; bar values are
    written vertically inside the bars and the legend sits under the panels, so nothing overlaps."""
    if not rows:
        raise ValueError("No results to plot.")
    kind = rows[0][1]["scoring"]
    subsets = list(rows[0][1]["scores"])
    for name, result in rows:
        if result["scoring"] != kind or list(result["scores"]) != subsets:
            raise ValueError(f"Result {name!r} has another scoring or other subsets than {rows[0][0]!r}.")
    metrics = METRICS[kind]
    panel_width = max(2.6, 0.35 * len(rows) * len(subsets) + 0.8)
    figure = _figure(panel_width * len(metrics), 3.6 + 0.25 * len(rows))
    width = 0.8 / len(rows)
    for k, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), k + 1)
        for j, (name, result) in enumerate(rows):
            values = [100 * result["scores"][s][metric] for s in subsets]
            positions = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(subsets))]
            bars = axes.bar(positions, values, width, label=name)
            axes.bar_label(bars, fmt="%.1f", fontsize="x-small", rotation=90, label_type="edge", padding=2)
        axes.set_xticks(range(len(subsets)), [SUBSET_TITLES[s] for s in subsets], rotation=30, ha="right")
        axes.set_ylim(0, 115)
        axes.set_yticks(range(0, 101, 20))
        axes.set_title(HEADERS[metric])
        if k == 0:
            axes.set_ylabel("%")
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize="small",
                  ncols=min(len(rows), 4))  # fmt: skip
    figure.suptitle(f"{kind} scores per subset")
    figure.savefig(path, dpi=100)
