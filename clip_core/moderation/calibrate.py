"""`clip-calibrate`: sets each category's threshold of a policy from labelled data.

    clip-calibrate --policy shapes.yaml --data DIR --target-precision 0.95
    clip-calibrate --policy shapes.yaml --csv labels.csv --target-fpr 0.01 --out next.yaml

Data (docs/moderation.md): `--data DIR` holds `DIR/<category>/positive/*` and
`DIR/<category>/negative/*` images, each category calibrated on its own images (a policy
category with no folder keeps its threshold); or `--csv FILE` of `path[,category...]`
rows naming the categories each image belongs to, every category calibrated on every row.

The images are embedded with the server's model code and scored by the server's own
`scoring.PolicyScorer`, so a threshold means the same thing online. A decision is
`score >= threshold`; for each category the threshold is

- `--target-precision X`: the lowest score at which the flagged items' precision reaches
  X (the most recall that keeps that precision on this data); when no threshold reaches
  it, the one with the highest precision, marked `reached: false`;
- `--target-fpr X`: the lowest score at which at most X of the negatives are flagged.

The thresholds are written as the policy's next version (`version + 1`, with a
`calibration` record per category), by default over the policy file itself: a policy
folder holds one file per policy name, and the previous version is kept as
`previous/<stem>.v<old version><suffix>` below it (the server reads no sub-folders). A
report (`report.md`, a PR plot per category) goes to `--report` (default
`<out>.calibration/`). Head paths are rewritten for wherever a file is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ClipCoreError, InvalidInput
from .data import images_in, read_label_rows
from .embed import Embedder
from .heads import load_policy_heads
from .policy import Policy, dump_policy, load_policy, parse_policy, policy_dict
from .reports import Counts, markdown_table, plot_pr_curve, sweep
from .scoring import PolicyScorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    kind: Literal["precision", "fpr"]
    value: float

    def __post_init__(self) -> None:
        if not 0 <= self.value <= 1:
            raise InvalidInput(f"the target {self.kind} must be in [0, 1], not {self.value}")

    def describe(self) -> str:
        return f"{self.kind} {'>=' if self.kind == 'precision' else '<='} {self.value:g}"


@dataclass(frozen=True)
class Choice:
    """The threshold chosen for one category and what it achieves on the data."""

    threshold: float
    counts: Counts
    reached: bool


def choose_threshold(scores: np.ndarray, labels: np.ndarray, target: Target) -> Choice:
    """scores (N,), labels (N,) bool -> the threshold for `target` (decisions `>=`).

    Candidates are the distinct scores and the next float above the highest (flags
    nothing). Precision: the lowest candidate whose flagged items have precision >= the
    target, at least one flagged; if none, the highest-precision candidate that flags
    something (the lowest of equals). FPR: the lowest candidate with FP / negatives <= the
    target (the top candidate always qualifies).
    """
    sw = sweep(scores, labels)
    if sw.positives == 0 or sw.negatives == 0:
        raise InvalidInput(f"calibration needs positives and negatives; got {sw.positives} "
                           f"positive and {sw.negatives} negative items")
    if target.kind == "fpr":
        ok = sw.fpr <= target.value  # non-increasing in the threshold: a suffix is True
        k = int(np.flatnonzero(ok)[0])
        return Choice(float(sw.thresholds[k]), sw.at(k), reached=True)
    flags = (sw.tp + sw.fp) > 0
    # A tolerance for the division: 19/20 must count as reaching 0.95.
    ok = flags & (sw.precision >= target.value - 1e-12)
    if ok.any():
        k = int(np.flatnonzero(ok)[0])
        return Choice(float(sw.thresholds[k]), sw.at(k), reached=True)
    precision = np.where(flags, sw.precision, -1.0)
    k = int(np.flatnonzero(precision == precision.max())[0])
    return Choice(float(sw.thresholds[k]), sw.at(k), reached=False)


# ---- data ----


@dataclass(frozen=True)
class CategoryData:
    """A category's labelled items: indices into the embedded images, and their truth."""

    index: np.ndarray  # (n,) int
    labels: np.ndarray  # (n,) bool


def read_folders(root: Path, policy: Policy) -> tuple[list[Path], dict[str, CategoryData]]:
    """`root/<category>/{positive,negative}/*` -> the images and each category's items."""
    if not root.is_dir():
        raise InvalidInput(f"{root}: not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = sorted(set(found) - set(policy.categories))
    if unknown:
        raise InvalidInput(f"{root}: folders {unknown} are not categories of policy "
                           f"{policy.name!r} ({sorted(policy.categories)})")
    paths: list[Path] = []
    out: dict[str, CategoryData] = {}
    for name in found:
        pos = images_in(root / name / "positive") if (root / name / "positive").is_dir() else []
        neg = images_in(root / name / "negative") if (root / name / "negative").is_dir() else []
        if not pos or not neg:
            raise InvalidInput(f"{root / name}: needs images in both positive/ and negative/")
        start = len(paths)
        paths += pos + neg
        out[name] = CategoryData(np.arange(start, len(paths)),
                                 np.arange(len(pos) + len(neg)) < len(pos))
    if not out:
        raise InvalidInput(f"{root}: no category folders (<category>/positive, /negative)")
    return paths, out


def read_csv(file: Path, policy: Policy) -> tuple[list[Path], dict[str, CategoryData]]:
    """`path[,category...]` rows -> the images, every category over every row."""
    rows = read_label_rows(file)
    named = {c for _, cats in rows for c in cats}
    unknown = sorted(named - set(policy.categories))
    if unknown:
        raise InvalidInput(f"{file}: categories {unknown} are not in policy {policy.name!r} "
                           f"({sorted(policy.categories)})")
    index = np.arange(len(rows))
    return [p for p, _ in rows], {
        name: CategoryData(index, np.array([name in cats for _, cats in rows], dtype=bool))
        for name in policy.categories}


# ---- the policy's next version ----


def calibrated_policy(policy: Policy, choices: dict[str, Choice], target: Target,
                      data: str, out: Path, now: dt.datetime) -> Policy:
    """Version + 1, the chosen thresholds and their `calibration` records; head paths
    rewritten relative to `out`'s folder when it differs from the policy's."""
    doc = _relocated(policy, out)
    doc["version"] = policy.version + 1
    for name, choice in choices.items():
        cat = doc["categories"][name]
        k = choice.counts
        cat["calibration"] = {
            "target": {target.kind: target.value},
            "reached": choice.reached,
            "precision": round(k.precision, 6), "recall": round(k.recall, 6),
            "fpr": round(k.fpr, 6), "positives": k.positives, "negatives": k.negatives,
            "previous_threshold": policy.categories[name].threshold,
            "from_version": policy.version, "data": data,
            "date": now.isoformat(timespec="seconds"),
        }
        cat["threshold"] = choice.threshold
    return parse_policy(doc, out)


def _relocated(policy: Policy, out: Path) -> dict:
    """The policy's file form, its head paths relative to `out`'s folder."""
    doc = policy_dict(policy)
    for name, cat in policy.categories.items():
        if cat.head is not None and not Path(cat.head.path).is_absolute():
            moved = Path(os.path.relpath(policy.head_path(cat.head).resolve(),
                                         out.resolve().parent))
            doc["categories"][name]["head"]["path"] = moved.as_posix()
    return doc


def previous_path(policy_path: Path, version: int) -> Path:
    """Where an overwritten version is kept: a sub-folder, which the server does not read."""
    return policy_path.parent / "previous" / f"{policy_path.stem}.v{version}{policy_path.suffix}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_report(folder: Path, old: Policy, new: Policy, choices: dict[str, Choice],
                 target: Target, scores: dict[str, tuple[np.ndarray, np.ndarray]],
                 data: str) -> str:
    """report.md and pr_<category>.png in `folder`; returns the table."""
    rows: list[tuple[object, ...]] = []
    for name, cat in new.categories.items():
        if name not in choices:
            rows.append((name, cat.threshold, "not calibrated (no data)", "", "", "", "", ""))
            continue
        c = choices[name]
        k = c.counts
        rows.append((name, f"{c.threshold:.6g}", "yes" if c.reached else "NO", k.precision,
                     k.recall, k.fpr, k.positives, k.negatives))
    table = markdown_table(["category", "threshold", "target reached", "precision", "recall",
                            "FPR", "positives", "negatives"], rows)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (s, y) in scores.items():
        k = choices[name].counts
        plot_pr_curve(folder / f"pr_{_slug(name)}.png", f"{new.name} / {name}", s, y,
                      chosen=(k.recall, k.precision), label=name)
    (folder / "report.md").write_text(
        f"# Calibration of policy {new.name} v{old.version} -> v{new.version}\n\n"
        f"Target: {target.describe()} per category; data: {data}; model: {new.model}.\n\n"
        f"{table}", encoding="utf-8")
    return table


# ---- the command ----


@dataclass
class Calibration:
    policy: Policy  # the next version
    choices: dict[str, Choice]
    out: Path
    report: Path
    table: str


def calibrate(policy_path: Path, *, embedder: Embedder, target: Target,
              data_dir: Path | None = None, csv: Path | None = None, out: Path | None = None,
              report: Path | None = None, now: dt.datetime | None = None) -> Calibration:
    policy = load_policy(policy_path)
    if (data_dir is None) == (csv is None):
        raise InvalidInput("give exactly one of --data or --csv")
    # A head for another model is refused here as it is at the server's start-up.
    heads = load_policy_heads(policy, expect_fingerprint=embedder.fingerprint)
    if data_dir is not None:
        paths, per_category = read_folders(data_dir, policy)
        source = str(data_dir)
    else:
        assert csv is not None
        paths, per_category = read_csv(csv, policy)
        source = str(csv)
    scorer = PolicyScorer(policy, embedder.texts, heads, embedder.logit_scale)
    emb = embedder.images(paths)
    all_scores = scorer.score(emb, "image", categories=list(per_category))
    missing = sorted(set(per_category) - set(all_scores))
    if missing:
        raise InvalidInput(f"categories {missing} do not score images (their heads were "
                           f"trained on texts); calibrate them on image data of their kind")
    choices, scored = {}, {}
    for name, d in per_category.items():
        s = all_scores[name][d.index]
        choices[name] = choose_threshold(s, d.labels, target)
        scored[name] = (s, d.labels)
    out = out or policy_path
    nxt = calibrated_policy(policy, choices, target, source, out,
                            now or dt.datetime.now(dt.timezone.utc))
    if out.resolve() == policy_path.resolve():
        keep = previous_path(policy_path, policy.version)
        keep.parent.mkdir(parents=True, exist_ok=True)
        dump_policy(parse_policy(_relocated(policy, keep), keep), keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    dump_policy(nxt, out)
    report = report or out.with_name(out.name + ".calibration")
    table = write_report(report, policy, nxt, choices, target, scored, source)
    return Calibration(nxt, choices, out, report, table)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", type=Path, required=True, help="the policy file (YAML or JSON)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="DIR/<category>/{positive,negative}/ images")
    src.add_argument("--csv", type=Path, help="path[,category...] rows")
    tgt = p.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-precision", type=float)
    tgt.add_argument("--target-fpr", type=float)
    p.add_argument("--out", type=Path, default=None,
                   help="where the next version goes (default: over --policy, the old version "
                        "kept in previous/<stem>.v<version>.yaml beside it)")
    p.add_argument("--report", type=Path, default=None,
                   help="report folder (default: <out>.calibration)")
    p.add_argument("--model", default=None,
                   help="registry name or checkpoint path (default: the policy's model)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16: the dtype it is served in")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    target = (Target("precision", args.target_precision) if args.target_precision is not None
              else Target("fpr", args.target_fpr))
    try:
        model = args.model or load_policy(args.policy).model
        embedder = Embedder.from_name(model, device=args.device, dtype=args.dtype,
                                      batch_size=args.batch_size, progress=not args.no_progress)
        result = calibrate(args.policy, embedder=embedder, target=target, data_dir=args.data,
                           csv=args.csv, out=args.out, report=args.report)
    except ClipCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"policy {result.policy.name} v{result.policy.version} -> {result.out} "
          f"(target {target.describe()})")
    print(result.table, end="")
    unreached = [n for n, c in result.choices.items() if not c.reached]
    if unreached:
        print(f"warning: the target is not reached for {unreached}", file=sys.stderr)
    print(f"report: {result.report}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
