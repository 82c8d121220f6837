"""Precision, recall and PR curves for binary decisions `score >= threshold`, and the
tables and plots the offline moderation tools write.

Pure numpy except `plot_pr_curve`, which imports matplotlib (the `moderation` extra) only
when called, with the Agg backend: the tools run on servers with no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Counts:
    """A confusion matrix of one binary decision over a labelled set."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        # Nothing flagged: no false alarm was raised, so precision is 1 by convention.
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.fp + self.tn


def counts(flagged: np.ndarray, labels: np.ndarray) -> Counts:
    """flagged, labels: (N,) bool."""
    f, y = np.asarray(flagged, bool), np.asarray(labels, bool)
    return Counts(tp=int((f & y).sum()), fp=int((f & ~y).sum()), fn=int((~f & y).sum()),
                  tn=int((~f & ~y).sum()))


@dataclass(frozen=True)
class Sweep:
    """Every distinct decision `score >= t` over a labelled set, by ascending threshold.

    `thresholds` (K,) are the distinct scores and, last, the next float above the highest
    (flag nothing); `tp`, `fp` (K,) are the counts each flags. P and N are the positives
    and negatives.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: int
    negatives: int

    @property
    def precision(self) -> np.ndarray:
        flagged = self.tp + self.fp
        return np.where(flagged > 0, self.tp / np.maximum(flagged, 1), 1.0)

    @property
    def recall(self) -> np.ndarray:
        return self.tp / self.positives if self.positives else np.zeros(len(self.tp))

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / self.negatives if self.negatives else np.zeros(len(self.fp))

    def at(self, k: int) -> Counts:
        tp, fp = int(self.tp[k]), int(self.fp[k])
        return Counts(tp=tp, fp=fp, fn=self.positives - tp, tn=self.negatives - fp)


def sweep(scores: np.ndarray, labels: np.ndarray) -> Sweep:
    """scores (N,) float, labels (N,) bool -> the decisions at every distinct threshold."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores but {y.shape[0]} labels")
    if s.size == 0:
        raise ValueError("no scores to sweep")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    thresholds, first = np.unique(s, return_index=True)  # ascending; first index of each
    # Flagged at threshold t = the items from t's first index to the end.
    pos_from = np.cumsum(y[::-1])[::-1]  # (N,) positives at index >= i
    tp = pos_from[first]
    fp = (len(s) - first) - tp
    # The threshold above every score flags nothing. nextafter in float32 so that a float32
    # score equal to the maximum still falls below it.
    top = float(np.nextafter(np.float32(s[-1]), np.float32(np.inf)))
    if top <= s[-1]:
        top = float(np.nextafter(s[-1], np.inf))
    return Sweep(thresholds=np.append(thresholds, top), tp=np.append(tp, 0),
                 fp=np.append(fp, 0), positives=int(y.sum()), negatives=int((~y).sum()))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the PR curve as a step function of recall (no interpolation)."""
    sw = sweep(scores, labels)
    if sw.positives == 0:
        return float("nan")
    # Thresholds descending: recall grows from 0; each step's precision times its recall gain.
    recall, precision = sw.recall[::-1], sw.precision[::-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_pr_curve(path: str | Path, title: str, scores: np.ndarray, labels: np.ndarray,
                  chosen: tuple[float, float] | None = None, label: str = "") -> Path:
    """A PNG of precision against recall; `chosen` (recall, precision) marks a threshold."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - the extra is part of `.[test]`
        raise RuntimeError("PR plots need matplotlib: pip install 'clip-server[moderation]'"
                           ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = sweep(scores, labels)
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    try:
        ax.step(sw.recall[::-1], sw.precision[::-1], where="post", label=label or None)
        if chosen is not None:
            ax.plot([chosen[0]], [chosen[1]], "o", color="C3", label="chosen threshold")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title=title)
        ax.grid(alpha=0.3)
        if label or chosen is not None:
            ax.legend(loc="lower left")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
