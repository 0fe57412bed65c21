"""How ``r2d2 eval`` reports: recall@k curves, their plot, the Markdown table of the metrics."""

from __future__ import annotations

import matplotlib
import numpy as np
import torch

from r2d2.engine.metrics import ranks_of_targets


def recall_curve(scores: torch.Tensor, targets, max_k: int) -> np.ndarray:
    ranks = ranks_of_targets(scores.numpy(), targets)
    return np.array([100.0 * np.mean(ranks < k) for k in range(1, max_k + 1)])


def plot_recall(curves: dict[str, np.ndarray], path: str, title: str) -> None:
    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt  # after use(): pyplot picks its backend on import

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, y in curves.items():
        ax.plot(
            np.arange(1, len(y) + 1),
            y,
            label=label,
            linestyle="--" if "pre-rank only" in label else "-",
        )
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(task: str, metrics: dict, notes: list[str] | None = None) -> str:
    notes = list(notes or [])
    if task == "retrieval":
        keys = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"]
        head = "| stage | " + " | ".join(keys) + " |"
        rows = [head, "|" + "---|" * (len(keys) + 1)]
        for stage in ("pre_rank", "pre_rank+rank"):
            if metrics.get(stage):
                rows.append(
                    f"| {stage} | " + " | ".join(f"{metrics[stage][k]:.2f}" for k in keys) + " |"
                )
        text = "\n".join(rows) + (
            f"\n\n{metrics['n_images']} images, {metrics['n_texts']} texts, "
            f"re-rank k = {metrics['k']}; mean_recall = mean of "
            f"{metrics.get('mean_recall_of', 'the six recalls')}\n"
        )
        notes = list(metrics.get("notes") or []) + notes
    else:
        keys = ["auc", "accuracy"] if task == "matching" else ["top1", "top5"]
        fmt = {"auc": "{:.4f}"}
        rows = [
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
            "| " + " | ".join(fmt.get(k, "{:.2f}").format(metrics[k]) for k in keys) + " |",
        ]
        text = "\n".join(rows) + "\n"
    return text + "".join(f"\nNote: {n}\n" for n in notes)
