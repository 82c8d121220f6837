"""clip-calibrate: threshold selection against a brute-force reference, the next version
of the policy with its calibration record, and the command on generated scenes."""

from __future__ import annotations

import datetime as dt
import math
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clip_core.errors import HeadModelMismatch, InvalidInput
from clip_core.loader import load
from clip_core.moderation.calibrate import (
    Choice,
    Target,
    _relocated,
    calibrate,
    calibrated_policy,
    choose_threshold,
    main,
    previous_path,
)
from clip_core.moderation.embed import Embedder
from clip_core.moderation.heads import Head, load_policy_heads, save_head
from clip_core.moderation.policy import dump_policy, load_policies, load_policy, parse_policy
from clip_core.moderation.reports import Counts, sweep
from clip_core.moderation.scoring import PolicyScorer
from clip_core.moderation.shapes_demo import EXAMPLE, generate

# ---- a reference written from the definitions, one threshold at a time ----


def _brute(scores, labels, target: Target):
    """Every candidate (each score, and +inf for "flag nothing"), in ascending order,
    with plain Python counting; returns (threshold, precision, fpr, reached)."""
    cands = [*sorted(set(float(s) for s in scores)), math.inf]
    n_neg = sum(1 for y in labels if not y)
    rows = []
    for t in cands:
        tp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= t and y)
        fp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= t and not y)
        prec = tp / (tp + fp) if tp + fp else None
        rows.append((t, prec, fp / n_neg))
    if target.kind == "fpr":
        return next((t, p, f, True) for t, p, f in rows if f <= target.value)
    for t, p, f in rows:
        if p is not None and p >= target.value - 1e-12:
            return t, p, f, True
    best = max(p for _, p, _ in rows if p is not None)
    t, p, f = next(r for r in rows if r[1] == best)
    return t, p, f, False


def _same(choice: Choice, ref) -> None:
    t, p, f, reached = ref
    if math.isinf(t):  # "flag nothing": any threshold above every score
        assert choice.counts.tp + choice.counts.fp == 0
    else:
        assert choice.threshold == t
        assert choice.counts.precision == pytest.approx(p)
    assert choice.counts.fpr == pytest.approx(f)
    assert choice.reached is reached


def test_precision_target_on_a_worked_example():
    # Descending: + + - + - - ...  At 0.7 the top four hold 3 positives: 3/4 = 0.75.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)
    c = choose_threshold(scores, labels, Target("precision", 0.75))
    assert c.threshold == 0.6 and c.reached
    assert c.counts == Counts(tp=3, fp=1, fn=1, tn=3)
    # 2/3 at 0.7 (0.667) is below 0.7; 0.75 at 0.6 is the lowest that reaches it.
    assert choose_threshold(scores, labels, Target("precision", 0.7)).threshold == 0.6
    assert choose_threshold(scores, labels, Target("precision", 1.0)).threshold == 0.8


def test_fpr_target_on_a_worked_example():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)
    # Four negatives; at most one flagged (0.25): everything from 0.7 up.
    assert choose_threshold(scores, labels, Target("fpr", 0.25)).threshold == 0.6
    c = choose_threshold(scores, labels, Target("fpr", 0.0))
    assert c.threshold == 0.8 and c.counts.fp == 0 and c.counts.tp == 2


def test_fpr_zero_above_every_score_flags_nothing():
    scores = np.array([0.3, 0.2, 0.1], np.float32)
    labels = np.array([0, 1, 1], bool)
    c = choose_threshold(scores, labels, Target("fpr", 0.0))
    assert c.threshold > 0.3 and not (scores >= c.threshold).any()
    assert c.counts == Counts(tp=0, fp=0, fn=2, tn=1)


def test_an_unreachable_precision_is_said_so():
    labels = np.array([0, 1, 0, 1], bool)
    c = choose_threshold(np.array([0.9, 0.8, 0.7, 0.6]), labels, Target("precision", 0.9))
    assert not c.reached and c.counts.precision == pytest.approx(0.5)
    assert c.threshold == 0.6  # the lowest of the equally precise thresholds


def test_calibration_needs_both_kinds_of_item():
    with pytest.raises(InvalidInput, match="positives and negatives"):
        choose_threshold(np.array([0.1, 0.2]), np.array([1, 1], bool), Target("fpr", 0.1))
    with pytest.raises(InvalidInput):
        Target("precision", 1.5)


scores_labels = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 3.0]), min_size=n,
             max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n)))


@settings(max_examples=100, deadline=None)
@given(scores_labels, st.sampled_from([0.0, 0.3, 0.5, 0.8, 0.9, 1.0]),
       st.sampled_from(["precision", "fpr"]))
def test_choices_match_the_brute_force_reference(data, value, kind):
    scores, labels = data
    if all(labels) or not any(labels):
        return
    target = Target(kind, value)  # type: ignore[arg-type]
    _same(choose_threshold(np.array(scores), np.array(labels), target),
          _brute(scores, labels, target))


@settings(max_examples=60, deadline=None)
@given(scores_labels)
def test_the_sweep_counts_match_a_direct_count(data):
    scores, labels = data
    sw = sweep(np.array(scores), np.array(labels))
    for t, tp, fp in zip(sw.thresholds, sw.tp, sw.fp, strict=True):
        flagged = [s >= t for s in scores]
        assert tp == sum(f and y for f, y in zip(flagged, labels, strict=True))
        assert fp == sum(f and not y for f, y in zip(flagged, labels, strict=True))
    assert sw.tp[-1] == sw.fp[-1] == 0


# ---- the next version of a policy ----


def _policy_with_head(folder, fingerprint="sha256:abc"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_head(folder / "h.safetensors", Head(
        kind="linear", multi_label=False, classes=["no", "yes"], model="m",
        fingerprint=fingerprint,
        tensors={"weight": rng.normal(size=(2, 128)), "bias": np.zeros(2)}))
    (folder / "p.yaml").write_text(
        "name: p\nversion: 3\nmodel: builtin/clip-shapes\ncategories:\n"
        "  a:\n    threshold: 1.0\n    prompts: {positive: [a red shape]}\n"
        "  b:\n    threshold: 0.5\n    head: {path: h.safetensors, class: 'yes'}\n")
    return folder / "p.yaml"


def test_the_next_version_records_its_calibration_and_finds_its_head(tmp_path):
    policy = load_policy(_policy_with_head(tmp_path / "src"))
    choice = Choice(0.25, Counts(tp=9, fp=1, fn=3, tn=87), reached=True)
    out = tmp_path / "elsewhere" / "deeper" / "p.yaml"
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    nxt = calibrated_policy(policy, {"b": choice}, Target("precision", 0.9), "DATA", out, now)
    assert nxt.version == 4 and nxt.categories["b"].threshold == 0.25
    assert nxt.categories["a"].threshold == 1.0 and nxt.categories["a"].calibration is None
    rec = nxt.categories["b"].calibration
    assert rec is not None
    assert rec["target"] == {"precision": 0.9} and rec["reached"] is True
    assert (rec["precision"], rec["recall"]) == (0.9, 0.75)
    assert rec["previous_threshold"] == 0.5 and rec["from_version"] == 3
    assert rec["date"] == "2026-01-02T03:04:05+00:00" and rec["data"] == "DATA"
    head_ref = nxt.categories["b"].head
    assert head_ref is not None
    assert nxt.head_path(head_ref).resolve() == (tmp_path / "src" / "h.safetensors").resolve()


def test_calibrating_in_place_keeps_the_previous_version_with_a_working_head_path(tmp_path):
    path = _policy_with_head(tmp_path / "src")
    policy = load_policy(path)
    kept = previous_path(path, policy.version)
    assert kept == tmp_path / "src" / "previous" / "p.v3.yaml"
    kept.parent.mkdir()
    dump_policy(parse_policy(_relocated(policy, kept), kept), kept)
    again = load_policy(kept)
    ref = again.categories["b"].head
    assert ref is not None and ref.path == "../h.safetensors"
    assert again.head_path(ref).resolve() == (tmp_path / "src" / "h.safetensors").resolve()


# ---- the command, on scenes through the built-in model ----


@pytest.fixture(scope="module")
def embedder():
    return Embedder(load("builtin/clip-shapes"), progress=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("calib") / "scenes", seed=31, n=160)


def _prompt_only_policy(folder):
    """The example's prompt category alone (the head is the proof's, tested end to end)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = EXAMPLE.read_text()
    text = text[: text.index("  stars:")]
    (folder / "shapes.yaml").write_text(text)
    return folder / "shapes.yaml"


def test_the_command_calibrates_from_a_csv_in_place(embedder, scenes, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setattr(Embedder, "from_name", classmethod(lambda cls, *a, **k: embedder))
    path = _prompt_only_policy(tmp_path / "policies")
    rows = [r.split(",") for r in scenes.categories_csv.read_text().split()]
    labels = tmp_path / "red.csv"  # the policy's one category: stars left out
    labels.write_text("".join(f"{scenes.folder / r[0]},{'red_shapes' * ('red_shapes' in r)}\n"
                              for r in rows))
    rc = main(["--policy", str(path), "--csv", str(labels),
               "--target-precision", "0.9", "--no-progress"])
    assert rc == 0
    assert "| red_shapes |" in capsys.readouterr().out
    new, old = load_policy(path), load_policy(tmp_path / "policies" / "previous" / "shapes.v1.yaml")
    assert (old.version, new.version) == (1, 2)
    t = new.categories["red_shapes"].threshold
    assert new.categories["red_shapes"].calibration["target"] == {"precision": 0.9}
    report = tmp_path / "policies" / "shapes.yaml.calibration"
    assert (report / "pr_red_shapes.png").stat().st_size > 0
    assert "red_shapes" in (report / "report.md").read_text()

    # Re-scored here: the threshold meets the target, and the next lower score does not.
    truth = np.array(["red_shapes" in r[1:] for r in rows])
    scorer = PolicyScorer(new, embedder.texts, {}, embedder.logit_scale)
    s = scorer.score(embedder.images([scenes.folder / r[0] for r in rows]))["red_shapes"]
    assert truth.sum() and (~truth).sum()
    assert truth[s >= t].mean() >= 0.9
    below = s[s < t].max()
    assert truth[s >= below].mean() < 0.9
    # The folder the server loads holds one policy file; the old one is in a sub-folder.
    assert [p.name for p in (tmp_path / "policies").iterdir() if p.is_file()] == ["shapes.yaml"]
    assert list(load_policies(tmp_path / "policies")) == ["shapes"]


def test_the_command_calibrates_from_category_folders(embedder, scenes, tmp_path, monkeypatch):
    monkeypatch.setattr(Embedder, "from_name", classmethod(lambda cls, *a, **k: embedder))
    data = tmp_path / "data"
    rows = [r.split(",") for r in scenes.categories_csv.read_text().split()]
    for kind in ("positive", "negative"):
        (data / "red_shapes" / kind).mkdir(parents=True)
    for r in rows:
        kind = "positive" if "red_shapes" in r[1:] else "negative"
        shutil.copy(scenes.folder / r[0], data / "red_shapes" / kind / r[0])
    src = _prompt_only_policy(tmp_path / "src")
    out = tmp_path / "out" / "shapes.yaml"
    assert main(["--policy", str(src), "--data", str(data), "--target-fpr", "0.02",
                 "--out", str(out), "--report", str(tmp_path / "rep"), "--no-progress"]) == 0
    assert load_policy(src).version == 1  # --out leaves the source alone
    new = load_policy(out)
    rec = new.categories["red_shapes"].calibration
    assert new.version == 2 and rec["fpr"] <= 0.02 and rec["target"] == {"fpr": 0.02}
    assert (tmp_path / "rep" / "report.md").is_file()


def test_a_head_for_another_model_is_refused(embedder, scenes, tmp_path):
    path = _policy_with_head(tmp_path, fingerprint="sha256:" + "0" * 64)
    with pytest.raises(HeadModelMismatch):
        load_policy_heads(load_policy(path), expect_fingerprint=embedder.fingerprint)
    with pytest.raises(HeadModelMismatch, match=r"h\.safetensors"):
        calibrate(path, embedder=embedder, target=Target("precision", 0.9),
                  csv=scenes.categories_csv)


def test_unknown_categories_in_the_data_are_refused(embedder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Embedder, "from_name", classmethod(lambda cls, *a, **k: embedder))
    path = _prompt_only_policy(tmp_path / "p")
    (tmp_path / "d" / "violence" / "positive").mkdir(parents=True)
    assert main(["--policy", str(path), "--data", str(tmp_path / "d"),
                 "--target-precision", "0.9"]) == 2
    assert "violence" in capsys.readouterr().err
