"""The moderation proof on the built-in model: scenes in, calibrated precision/recall out.

    python -m clip_core.moderation.shapes_demo --out out/moderation-shapes

1. generates labelled scenes (`clip_core.scenes`, every colour-shape combination) for three
   disjoint seeds: head training, calibration, evaluation;
2. trains a multi-label linear head over the six shapes (`clip-train-head --csv`), whose
   `star` class is the `stars` category of `examples/policies/shapes.yaml`;
3. calibrates the policy (`clip-calibrate --csv`, target precision 0.95 by default) on the
   calibration scenes, writing version 2 into `<out>/policies/`, a folder the server can
   load with `CLIP_POLICIES`;
4. scores fresh evaluation scenes with the calibrated policy and prints precision and
   recall per category (also in `<out>/evaluation.md`).

Nothing here is a typed-in number: the tables are whatever the current default model gives,
so a retrained model is re-measured by running the command again.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..scenes import SceneGenerator
from .calibrate import Calibration, Target, calibrate
from .data import read_label_csv
from .embed import Embedder
from .heads import load_policy_heads, save_head
from .policy import Policy, load_policy
from .reports import counts, markdown_table
from .scoring import PolicyScorer, decide
from .train_head import TrainConfig, train_head, write_report

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policies" / "shapes.yaml"
HEAD_FILE = "shapes-head.safetensors"  # as examples/policies/shapes.yaml names it
SEEDS = {"train": 2_100_001, "calibrate": 2_100_002, "evaluate": 2_100_003}


def scene_categories(shapes: list[tuple[str, str]]) -> list[str]:
    """The policy categories a scene of (colour, shape) pairs belongs to."""
    cats = []
    if any(c == "red" for c, _ in shapes):
        cats.append("red_shapes")
    if any(s == "star" for _, s in shapes):
        cats.append("stars")
    return cats


@dataclass(frozen=True)
class SceneSet:
    folder: Path
    shapes_csv: Path  # path,shape[,shape...]: the head's training labels
    categories_csv: Path  # path[,category...]: the policy's truth


def generate(folder: Path, seed: int, n: int, image_size: int = 64) -> SceneSet:
    """`n` random scenes of `seed` as PNGs, with both label files."""
    gen = SceneGenerator(image_size, split="all")
    folder.mkdir(parents=True, exist_ok=True)
    shape_rows, cat_rows = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = gen.scene(rng)
        name = f"{i:05d}.png"
        gen.render(scene, rng).save(folder / name)
        pairs = [(s.colour, s.shape) for s in scene.shapes]
        shape_rows.append([name, *sorted({s for _, s in pairs})])
        cat_rows.append([name, *scene_categories(pairs)])
    for file, rows in (("shapes.csv", shape_rows), ("categories.csv", cat_rows)):
        with (folder / file).open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    return SceneSet(folder, folder / "shapes.csv", folder / "categories.csv")


@dataclass
class Evaluation:
    table: str
    # {category: {"precision", "recall", "fpr", "positives", "negatives"}}
    metrics: dict[str, dict[str, float]]
    scores: dict[str, np.ndarray]  # (N,) per category
    truth: dict[str, np.ndarray]  # (N,) bool per category


def evaluate(policy: Policy, embedder: Embedder, scenes: SceneSet) -> Evaluation:
    """The policy's decisions on labelled scenes, scored as the server scores them."""
    with scenes.categories_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    paths = [scenes.folder / r[0] for r in rows]
    heads = load_policy_heads(policy, expect_fingerprint=embedder.fingerprint)
    scorer = PolicyScorer(policy, embedder.texts, heads, embedder.logit_scale)
    scores = scorer.score(embedder.images(paths, desc="embedding evaluation scenes"), "image")
    flagged = decide(scores, policy)
    truth = {c: np.array([c in r[1:] for r in rows]) for c in policy.categories}
    metrics, table_rows = {}, []
    for c in policy.categories:
        k = counts(flagged[c], truth[c])
        metrics[c] = {"precision": k.precision, "recall": k.recall, "fpr": k.fpr,
                      "positives": k.positives, "negatives": k.negatives}
        table_rows.append((c, f"{policy.categories[c].threshold:.4g}", k.precision, k.recall,
                           k.fpr, k.positives, k.negatives))
    table = markdown_table(["category", "threshold", "precision", "recall", "FPR",
                            "positives", "negatives"], table_rows)
    return Evaluation(table, metrics, scores, truth)


@dataclass
class Proof:
    policies: Path  # the folder for CLIP_POLICIES: the calibrated policy and its head
    head_table: str
    calibration: Calibration
    evaluation: Evaluation


def run(out: Path, embedder: Embedder, *, n_train: int = 1500, n_calibrate: int = 1000,
        n_evaluate: int = 1500, target: Target | None = None, epochs: int = 200,
        example: Path = EXAMPLE, seeds: dict[str, int] | None = None,
        plots: bool = True) -> Proof:
    seeds = seeds or SEEDS
    target = target or Target("precision", 0.95)
    data = {split: generate(out / "scenes" / split, seeds[split], n)
            for split, n in (("train", n_train), ("calibrate", n_calibrate),
                             ("evaluate", n_evaluate))}
    policies = out / "policies"
    if policies.exists():
        shutil.rmtree(policies)
    policies.mkdir(parents=True)
    policy_file = policies / example.name
    shutil.copy(example, policy_file)

    train = read_label_csv(data["train"].shapes_csv)
    emb = embedder.images(train.paths, desc="embedding training scenes")
    result = train_head(train, emb, model=embedder.name, fingerprint=embedder.fingerprint,
                        config=TrainConfig(kind="linear", epochs=epochs))
    save_head(policies / HEAD_FILE, result.head)
    head_table = write_report(result, train, out / "head-report", plots=plots)

    calibration = calibrate(policy_file, embedder=embedder, target=target,
                            csv=data["calibrate"].categories_csv,
                            report=out / "calibration-report")
    evaluation = evaluate(load_policy(policy_file), embedder, data["evaluate"])
    (out / "evaluation.md").write_text(
        f"# Policy {calibration.policy.name} v{calibration.policy.version} on "
        f"{n_evaluate} fresh scenes (seed {seeds['evaluate']})\n\n{evaluation.table}",
        encoding="utf-8")
    return Proof(policies, head_table, calibration, evaluation)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clip_core.moderation.shapes_demo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/moderation-shapes"))
    p.add_argument("--model", default="builtin/clip-shapes")
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-calibrate", type=int, default=1000)
    p.add_argument("--n-evaluate", type=int, default=1500)
    p.add_argument("--target-precision", type=float, default=0.95)
    p.add_argument("--policy", type=Path, default=EXAMPLE,
                   help="the version-1 policy (default: examples/policies/shapes.yaml)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    embedder = Embedder.from_name(args.model, progress=not args.no_progress)
    proof = run(args.out, embedder, n_train=args.n_train, n_calibrate=args.n_calibrate,
                n_evaluate=args.n_evaluate, target=Target("precision", args.target_precision),
                example=args.policy)
    print(f"head (validation split of {args.n_train} training scenes):\n{proof.head_table}")
    print(f"calibration ({args.n_calibrate} scenes, target "
          f"{Target('precision', args.target_precision).describe()}):\n"
          f"{proof.calibration.table}")
    print(f"evaluation ({args.n_evaluate} fresh scenes):\n{proof.evaluation.table}")
    print(f"serve it: CLIP_POLICIES={proof.policies} clip-serve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
