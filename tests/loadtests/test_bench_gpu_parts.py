"""loadtests/bench_gpu_parts.py runs end to end with --tiny on the CPU and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "loadtests" / "bench_gpu_parts.py"


def run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out), "--tiny"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_graphs_tiny(tmp_path):
    res = run(tmp_path, "graphs", "--model", "ViT-B-32", "--device", "cuda", "--dtype", "fp16",
              "--batches", "1,4,16")
    assert res["kind"] == "graphs" and res["errors"] == []
    assert [r["batch"] for r in res["rows"]] == [1, 4, 16]
    for row in res["rows"]:
        assert row["eager_images_per_s"] > 0
        assert row["graphs_images_per_s"] == "n/a"  # --tiny runs on the CPU


def test_preprocess_tiny(tmp_path):
    res = run(tmp_path, "preprocess", "--device", "cpu", "--threads", "1,2", "--images", "6")
    assert res["kind"] == "preprocess" and res["errors"] == []
    for path in ("exact", "draft"):
        assert set(res[path]) == {"1", "2"} and all(v > 0 for v in res[path].values())
    assert res["tensor"]["items_per_s"] > 0 and res["tensor"]["counts"]["fallback"] == 0
    tensor, draft = res["parity"]["tensor"], res["parity"]["draft"]
    assert tensor["max_grey_levels"] <= 2.0001 and tensor["min_cosine"] >= 0.999
    assert draft["min_cosine"] >= 0.99 and draft["max_abs_diff"] > 0
