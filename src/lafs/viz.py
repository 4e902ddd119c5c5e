"""Pictures: ROC curves of verification sets and affine-sensitivity curves (KP-RPE Fig. 5).

matplotlib is the optional ``viz`` extra and runs headless (Agg). Every function returns PNG bytes, or ``None``
without matplotlib, so callers write them atomically next to their JSON and never fail for a missing picture.
"""

from __future__ import annotations

import io

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig, ax, plt, xlabel: str, ylabel: str, title: str) -> bytes:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title[:60], fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def roc_png(curves: list[tuple[str, np.ndarray, np.ndarray]], title: str = "") -> bytes | None:
    """TAR vs FAR (log FAR) of ``(label, distances, issame)`` curves; a pair is accepted when its distance is small."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, dist, same in curves:
        same = np.asarray(same, bool)
        order = np.argsort(dist, kind="stable")
        far = np.cumsum(~same[order]) / max(1, (~same).sum())
        tar = np.cumsum(same[order]) / max(1, same.sum())
        ax.plot(np.maximum(far, 1e-6), tar, label=label)
    ax.set_xscale("log")
    return _png(fig, ax, plt, "FAR", "TAR", title)


def sensitivity_png(curves: list[tuple[str, dict]], title: str = "") -> bytes | None:
    """Accuracy (± fold std) against t, detector crop (0) -> aligned (1), of ``(label, affine_sensitivity result)``."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, result in curves:
        t = [p["t"] for p in result["points"]]
        acc = np.array([100 * p["accuracy"] for p in result["points"]])
        std = np.array([100 * p["accuracy_std"] for p in result["points"]])
        ax.errorbar(t, acc, yerr=std, marker="o", capsize=3, label=label)
    return _png(fig, ax, plt, "t: detector crop (0) -> 5-point aligned (1)", "verification accuracy %", title)
