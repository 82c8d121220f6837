"""`clip-train-head`: a classifier head over a model's image embeddings, for policies.

    clip-train-head --model builtin/clip-shapes --data DIR --out head.safetensors
    clip-train-head --model builtin/clip-shapes --csv labels.csv --out head.safetensors

`--data DIR` holds one sub-folder per class (one label per image: a softmax over the
classes); `--csv` rows are `path,label[,label...]` (any number of labels: one sigmoid per
class). The images are embedded with the server's own model code (`embed.Embedder`), a
validation split is held out (stratified by class for single-label data), and a logistic
regression (`--kind linear`) or a one-hidden-layer MLP (`--kind mlp`) is trained in torch
with class weights. Precision, recall and F1 per class on the validation split are
printed, written to `<out>.report/metrics.md` with a PR-curve PNG per class, and recorded
in the head file with the model's fingerprint (`heads.save_head`), so the server refuses
the head for any other model.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ClipCoreError, InvalidInput
from .data import LabelledImages, read_class_folders, read_label_csv
from .embed import Embedder
from .heads import Head, save_head
from .reports import average_precision, counts, markdown_table, plot_pr_curve

log = logging.getLogger(__name__)

Kind = Literal["linear", "mlp"]


@dataclass(frozen=True)
class TrainConfig:
    kind: Kind = "linear"
    hidden: int = 256  # the MLP's hidden width
    epochs: int = 200
    batch_size: int = 512
    lr: float = 1e-2
    weight_decay: float = 1e-4
    # "balanced" (inverse class frequency), "none", or explicit {class: weight}.
    class_weights: str | dict[str, float] = "balanced"
    val_split: float = 0.2
    seed: int = 0


@dataclass
class TrainResult:
    head: Head
    train_index: np.ndarray
    val_index: np.ndarray
    # {class: {"precision", "recall", "f1", "average_precision", "support"}} on validation
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    val_probs: np.ndarray | None = None  # (V, C)


def split_indices(labels: np.ndarray, val_split: float, seed: int, stratify: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """labels (N, C) bool -> (train, val) index arrays, sorted. Stratified: each class
    gives round(val_split * its count) items, and keeps at least one for training."""
    if not 0 <= val_split < 1:
        raise InvalidInput(f"--val-split must be in [0, 1), not {val_split}")
    n = len(labels)
    rng = np.random.default_rng(seed)
    if val_split == 0:
        return np.arange(n), np.empty(0, dtype=np.int64)
    if stratify:
        val = []
        for c in range(labels.shape[1]):
            members = rng.permutation(np.flatnonzero(labels[:, c]))
            k = min(round(val_split * len(members)), len(members) - 1)
            val.append(members[:k])
        val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    else:
        val_idx = np.sort(rng.permutation(n)[: round(val_split * n)]).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return train_idx, val_idx


def class_weights(labels: np.ndarray, classes: list[str], multi_label: bool,
                  spec: str | dict[str, float]) -> np.ndarray:
    """(C,) weights. Single-label: each class's weight in the cross-entropy ("balanced":
    N / (C * count)). Multi-label: each class's positive-term weight in its binary
    cross-entropy ("balanced": negatives / positives)."""
    pos = labels.sum(axis=0).astype(np.float64)  # (C,)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(classes))
        if unknown:
            raise InvalidInput(f"class weights name unknown classes {unknown}; "
                               f"the classes are {classes}")
        return np.array([float(spec.get(c, 1.0)) for c in classes])
    if spec == "none":
        return np.ones(len(classes))
    if spec != "balanced":
        raise InvalidInput(f"class weights must be 'balanced', 'none' or name=weight pairs, "
                           f"not {spec!r}")
    if multi_label:
        return (len(labels) - pos) / np.maximum(pos, 1.0)
    return len(labels) / (len(classes) * np.maximum(pos, 1.0))


def _layers(kind: Kind, dim: int, hidden: int, n_classes: int) -> list[torch.nn.Linear]:
    """The head's linear layers (ReLU between, for the MLP)."""
    if kind == "linear":
        return [torch.nn.Linear(dim, n_classes)]
    return [torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, n_classes)]


def fit(emb: np.ndarray, labels: np.ndarray, multi_label: bool, weights: np.ndarray,
        config: TrainConfig) -> dict[str, np.ndarray]:
    """emb (N, D) unit rows, labels (N, C) bool -> the head's tensors (clip-head/1 names).

    Trained on standardised features (each dimension's mean and spread over the training
    set), which a unit-norm embedding's small coordinates need for a well-conditioned
    problem; the standardisation is then folded into the first layer, so the head takes
    the raw unit-norm embedding as the server gives it.
    """
    x = torch.as_tensor(emb, dtype=torch.float32)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)  # (D,)
    z = (x - mean) / std
    y = torch.as_tensor(labels, dtype=torch.float32)  # (N, C)
    w = torch.as_tensor(weights, dtype=torch.float32)  # (C,)
    target = y.argmax(dim=1)  # (N,) for single-label
    n, dim = z.shape
    # A private generator: the caller's global torch RNG is neither read nor advanced.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        layers = _layers(config.kind, dim, config.hidden, y.shape[1])
        net = (layers[0] if len(layers) == 1
               else torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1]))
        order = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr,
                                weight_decay=config.weight_decay)
        for _ in range(config.epochs):
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, config.batch_size):
                idx = perm[start : start + config.batch_size]
                logits = net(z[idx])  # (B, C)
                if multi_label:
                    loss = F.binary_cross_entropy_with_logits(logits, y[idx], pos_weight=w)
                else:
                    loss = F.cross_entropy(logits, target[idx], weight=w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    first = layers[0]
    with torch.no_grad():
        # W (z) + b = (W / std) x + (b - W (mean / std))
        w1 = first.weight / std  # (H or C, D)
        b1 = first.bias - w1 @ mean
    if config.kind == "linear":
        return {"weight": w1.numpy(), "bias": b1.numpy()}
    out = layers[1]
    return {"hidden.weight": w1.numpy(), "hidden.bias": b1.numpy(),
            "out.weight": out.weight.detach().numpy(), "out.bias": out.bias.detach().numpy()}


def predicted(probs: np.ndarray, multi_label: bool) -> np.ndarray:
    """(N, C) probabilities -> (N, C) bool decisions: each class at 0.5 (multi-label), or
    the most probable class (single-label)."""
    if multi_label:
        return probs >= 0.5
    out = np.zeros(probs.shape, dtype=bool)
    out[np.arange(len(probs)), probs.argmax(axis=1)] = True
    return out


def validation_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str],
                       multi_label: bool) -> dict[str, dict[str, float]]:
    decisions = predicted(probs, multi_label)
    out = {}
    for c, name in enumerate(classes):
        k = counts(decisions[:, c], labels[:, c])
        ap = average_precision(probs[:, c], labels[:, c]) if k.positives else float("nan")
        out[name] = {"precision": k.precision, "recall": k.recall, "f1": k.f1,
                     "average_precision": ap, "support": float(k.positives)}
    return out


def train_head(data: LabelledImages, emb: np.ndarray, *, model: str, fingerprint: str,
               config: TrainConfig) -> TrainResult:
    """Splits, trains and evaluates; the head's `metrics` are the validation metrics."""
    if len(data.classes) < (1 if data.multi_label else 2):
        raise InvalidInput("single-label data needs at least two classes")
    train_idx, val_idx = split_indices(data.labels, config.val_split, config.seed,
                                       stratify=not data.multi_label)
    weights = class_weights(data.labels[train_idx], data.classes, data.multi_label,
                            config.class_weights)
    tensors = fit(emb[train_idx], data.labels[train_idx], data.multi_label, weights, config)
    head = Head(kind=config.kind, multi_label=data.multi_label, classes=list(data.classes),
                model=model, fingerprint=fingerprint, tensors=tensors)
    result = TrainResult(head, train_idx, val_idx)
    if len(val_idx):
        probs = head.predict(emb[val_idx])
        result.val_probs = probs
        result.metrics = validation_metrics(probs, data.labels[val_idx], data.classes,
                                            data.multi_label)
    head.metrics = {"split": "validation", "n_train": len(train_idx), "n_val": len(val_idx),
                    "classes": _json_safe(result.metrics)}
    return result


def _json_safe(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {c: {k: (None if np.isnan(v) else round(float(v), 6)) for k, v in m.items()}
            for c, m in metrics.items()}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "class"


def write_report(result: TrainResult, data: LabelledImages, folder: Path,
                 plots: bool = True) -> str:
    """metrics.md and (with `plots`) pr_<class>.png in `folder`; returns the table."""
    rows = [(c, m["precision"], m["recall"], m["f1"], m["average_precision"], int(m["support"]))
            for c, m in result.metrics.items()]
    table = markdown_table(["class", "precision", "recall", "F1", "AP", "support"], rows)
    folder.mkdir(parents=True, exist_ok=True)
    rule = "p >= 0.5 per class" if data.multi_label else "the most probable class"
    (folder / "metrics.md").write_text(
        f"# Head validation ({len(result.val_index)} held-out images; decisions: {rule})\n\n"
        f"{table}", encoding="utf-8")
    if plots and result.val_probs is not None:
        truth = data.labels[result.val_index]
        for c, name in enumerate(data.classes):
            if truth[:, c].any():
                plot_pr_curve(folder / f"pr_{_slug(name)}.png", f"{name} (validation)",
                              result.val_probs[:, c], truth[:, c])
    return table


def _parse_weights(text: str) -> str | dict[str, float]:
    if text in ("balanced", "none"):
        return text
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InvalidInput(f"--class-weights: {part!r} is not name=weight") from None
        if not sep or not name.strip():
            raise InvalidInput(f"--class-weights: {part!r} is not name=weight")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-train-head", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registry name or checkpoint path")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a folder with one sub-folder per class")
    src.add_argument("--csv", type=Path, help="path,label[,label...] rows (multi-label)")
    p.add_argument("--out", type=Path, required=True, help="the head file (.safetensors)")
    p.add_argument("--report", type=Path, default=None,
                   help="folder for metrics.md and the PR curves (default: <out>.report)")
    p.add_argument("--kind", choices=["linear", "mlp"], default="linear")
    p.add_argument("--hidden", type=int, default=TrainConfig.hidden)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--class-weights", default="balanced",
                   help="'balanced' (default), 'none', or name=weight,name=weight")
    p.add_argument("--val-split", type=float, default=TrainConfig.val_split)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16: the dtype it is served in")
    p.add_argument("--no-plots", action="store_true", help="metrics.md only, no PR-curve PNGs")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> TrainResult:
    data = read_label_csv(args.csv) if args.csv else read_class_folders(args.data)
    config = TrainConfig(kind=args.kind, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                         weight_decay=args.weight_decay,
                         class_weights=_parse_weights(args.class_weights),
                         val_split=args.val_split, seed=args.seed)
    embedder = Embedder.from_name(args.model, device=args.device, dtype=args.dtype,
                                  batch_size=args.batch_size, progress=not args.no_progress)
    emb = embedder.images(data.paths)
    result = train_head(data, emb, model=embedder.name, fingerprint=embedder.fingerprint,
                        config=config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_head(args.out, result.head)
    kind = "multi-label" if data.multi_label else "single-label"
    print(f"{args.out}: {config.kind} head, {kind}, classes {data.classes}, "
          f"{len(result.train_index)} train / {len(result.val_index)} validation images, "
          f"model {embedder.name} ({embedder.fingerprint[:19]}...)")
    if result.metrics:
        report = args.report or args.out.with_name(args.out.name + ".report")
        print(write_report(result, data, report, plots=not args.no_plots), end="")
        print(f"report: {report}/metrics.md")
    else:
        print("no validation split (--val-split 0): no metrics")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except ClipCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

