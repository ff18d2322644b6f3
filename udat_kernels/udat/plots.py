"""The experiment's figures: t-SNE of pre-GRL features (the paper's Fig. 3), learning curves and
confusion matrices."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .report import METHOD_TITLES  # noqa: E402

__all__ = ["plot_tsne", "plot_curves", "plot_confusion"]


def plot_tsne(features: dict[str, tuple], path, seed: int = 0) -> None:
    """features: {method: (source features (Ns, F), target features (Nt, F), epoch)} -> a row
    of 2-D t-SNE maps, source and target test images in two colours."""
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(features), figsize=(4.2 * len(features), 4.2), squeeze=False)
    for ax, (name, (src, tgt, epoch)) in zip(axes[0], features.items()):
        points = np.concatenate([src, tgt])
        perplexity = min(30.0, max(2.0, (len(points) - 1) / 3))
        xy = TSNE(n_components=2, init="pca", perplexity=perplexity,
                  random_state=seed).fit_transform(points)
        ax.scatter(*xy[:len(src)].T, s=4, c="tab:blue", label="source", alpha=0.6)
        ax.scatter(*xy[len(src):].T, s=4, c="tab:red", label="target", alpha=0.6)
        ax.set_title(f"{METHOD_TITLES.get(name, name)}\n(epoch {epoch})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="best", markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[list[dict]]], path) -> None:
    """curves: {method: [epoch records of each seed]} -> target test accuracy and domain loss
    per epoch, mean over seeds with the seeds' range shaded."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in curves.items():
        acc = np.array([[r["target_test"]["acc"] for r in run] for run in runs])
        epochs = np.arange(1, acc.shape[1] + 1)
        line, = acc_ax.plot(epochs, 100 * acc.mean(0), label=METHOD_TITLES.get(name, name))
        acc_ax.fill_between(epochs, 100 * acc.min(0), 100 * acc.max(0), alpha=0.15,
                            color=line.get_color())
        loss_d = np.array([[r["loss_d"] for r in run] for run in runs])
        if loss_d.any():
            loss_ax.plot(epochs, loss_d.mean(0), color=line.get_color(),
                         label=METHOD_TITLES.get(name, name))
    acc_ax.set(xlabel="epoch", ylabel="target test accuracy (%)", title="Target accuracy")
    loss_ax.set(xlabel="epoch", ylabel="domain loss", title="Domain classifier loss (train)")
    acc_ax.legend(fontsize=8)
    if loss_ax.lines:
        loss_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(matrices: list[list[list[int]]], classes, title: str, path) -> None:
    """The confusion matrices of one method's chosen models, summed over seeds: each row
    normalized to the true class's images (colour), with the counts written in."""
    total = np.sum(np.asarray(matrices, dtype=np.int64), axis=0)
    rows = total.sum(1, keepdims=True)
    share = np.divide(total, rows, out=np.zeros(total.shape, dtype=np.float64), where=rows > 0)
    size = 1.2 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(total[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}\n(summed over seeds)")
    ax.title.set_fontsize(9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
