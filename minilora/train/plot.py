"""Loss curves from a metrics.jsonl file as a PNG (needs matplotlib: `pip install 'minilora[plot]'`)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def plot_metrics(metrics_jsonl: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Plot training loss (and eval loss, when logged) against the step; returns the PNG's path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_metrics needs matplotlib: pip install 'minilora[plot]'") from None
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and "step" in r]
    if not train and not evals:
        raise ValueError(f"{path} has no 'loss' or 'eval_loss' records to plot")

    # Figure + Agg canvas instead of pyplot: no global state, no GUI backend, safe in notebooks and threads.
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set(xlabel="step", ylabel="loss", title=path.parent.name or "training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png
