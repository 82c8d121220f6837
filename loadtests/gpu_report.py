"""The last step of loadtests/gpu_check.sh: its steps' JSON answers merged into two files
(probe.json: env, parity, syncs, oom, raw, goal; parts.json: graphs, preprocess) and summary.md,
a short table of every step's status and headline followed by the numbers that matter.

    python3 loadtests/gpu_report.py --steps WORK/steps.tsv --work WORK --out OUT

steps.tsv has one line per step: name, status (ok, FAIL, TIMEOUT, SKIP), exit code, seconds
and a note. The script needs only the standard library, so it runs whatever else failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

PROBE = ("env", "parity", "syncs", "oom", "raw")  # gpu_probe.py's steps
PARTS = ("graphs", "preprocess", "graphs_l14")  # bench_gpu_parts.py's steps


def read_steps(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, rc, seconds, *note = [*line.split("\t"), ""]
            rows.append({"step": name, "status": status, "rc": rc, "seconds": seconds,
                         "note": note[0] if note else ""})
    return rows


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_headline(text: str) -> tuple[str, dict[str, Counter]]:
    """pytest's closing line, and per test file its outcomes, from `pytest -v -rA` output."""
    per_file: dict[str, Counter] = {}
    for m in re.finditer(r"^(tests/\S+?\.py)::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)",
                         text, re.M):
        per_file.setdefault(m.group(1), Counter())[m.group(2).lower()] += 1
    for m in re.finditer(r"^ERROR (tests/\S+?\.py)", text, re.M):  # collection errors
        per_file.setdefault(m.group(1), Counter())["error"] += 1
    closing = [line.strip("= ") for line in text.splitlines()
               if re.match(r"^=+ .*(passed|failed|error|skipped|no tests ran).* =+$", line)]
    return (closing[-1] if closing else "no pytest summary line"), per_file


def headline(step: str, work: Path, out: Path) -> str:
    if step == "tests":
        text = (out / "tests.txt").read_text() if (out / "tests.txt").exists() else ""
        return pytest_headline(text)[0]
    data = load(out / "service.json") if step == "service" else load(work / f"{step}.json")
    if isinstance(data, dict) and data.get("headline"):
        return str(data["headline"])
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def step_table(steps: list[dict], work: Path, out: Path) -> list[str]:
    lines = ["| step | status | exit | s | result |", "|---|---|---:|---:|---|"]
    for s in steps:
        result = headline(s["step"], work, out) or s["note"]
        lines.append(f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']} | "
                     f"{_cell(result)} |")
    return lines


def tests_section(out: Path) -> list[str]:
    path = out / "tests.txt"
    if not path.exists():
        return []
    closing, per_file = pytest_headline(path.read_text())
    lines = ["", "## GPU tests", "", f"pytest: {closing}", "",
             "| file | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|"]
    for f, c in sorted(per_file.items()):
        lines.append(f"| {f} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", path.read_text(), re.M)
    if failed:
        lines += ["", "failed: " + ", ".join(sorted(set(failed)))]
    return lines


def raw_section(raw: dict | None) -> list[str]:
    if not raw:
        return []
    models = [k for k, v in raw.items() if isinstance(v, dict) and "images_per_s" in v]
    if not models:
        return []
    lines = ["", "## Raw eager throughput (in process)", "",
             "| batch | " + " | ".join(f"{m} images/s" for m in models) + " |",
             "|---:|" + "---:|" * len(models)]
    sizes = sorted({int(b) for m in models for b in raw[m]["images_per_s"]})
    for b in sizes:
        lines.append(f"| {b} | " + " | ".join(
            str(raw[m]["images_per_s"].get(str(b), "-")) for m in models) + " |")
    sizes = sorted({int(b) for m in models for b in raw[m]["texts_per_s"]})
    if sizes:
        lines += ["", "| texts batch | " + " | ".join(f"{m} texts/s" for m in models) + " |",
                  "|---:|" + "---:|" * len(models)]
        for b in sizes:
            lines.append(f"| {b} | " + " | ".join(
                str(raw[m]["texts_per_s"].get(str(b), "-")) for m in models) + " |")
    return lines


def parity_section(parity: dict | None) -> list[str]:
    if not parity:
        return []
    lines = ["", "## Parity against fp32 (min / mean cosine)", "",
             "| model | compared | images | texts |", "|---|---|---|---|"]
    for model, result in parity.items():
        if not isinstance(result, dict) or "fp16" not in result:
            continue
        for what, r in result.items():
            lines.append(f"| {model} | {what} | {r['image']['min']} / {r['image']['mean']} | "
                         f"{r['text']['min']} / {r['text']['mean']} |")
    return lines


def syncs_section(syncs: dict | None) -> list[str]:
    if not syncs or "model_calls" not in syncs:
        return []
    lines = ["", f"## Host syncs per batch ({syncs.get('model', '')})", "",
             "| call | syncs | where |", "|---|---:|---|"]
    calls = {**{f"model {k}": v for k, v in syncs["model_calls"].items()},
             **{f"backend {k}": v for k, v in syncs.get("backend_calls", {}).items()
                if isinstance(v, dict)}}
    for name, r in calls.items():
        where = ", ".join(f"{k} x{n}" for k, n in r.get("where", {}).items())
        lines.append(f"| {name} | {r.get('count')} | {_cell(where)} |")
    return lines


def service_section(svc: dict | None, title: str = "Service end to end") -> list[str]:
    """gpu_load.py's report as a table; an open-loop phase names its goal and verdict."""
    if not svc or not svc.get("phases"):
        return []
    lines = ["", f"## {title}", "",
             f"server: {' '.join(svc['config'].get('server_args', []))} "
             f"{' '.join(f'{k}={v}' for k, v in svc['config'].get('server_env', {}).items())}; "
             f"ready in {svc.get('server_ready_s', '-')} s; "
             f"{svc['config'].get('clients')} load-generator processes", "",
             "| phase | items/s | p50 ms | p99 ms | ok | err | 503 | GPU % | server CPU cores "
             "| batches: size x count |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for phase, r in svc["phases"].items():
        if "summary" not in r:
            lines.append(f"| {phase} | {_cell(r.get('error', 'failed'))} |||||||||")
            continue
        s = r["summary"]
        lat = s.get("latency_ok_s") or {}
        gpu = r.get("gpu_util_pct")
        spread = "; ".join(
            f"{key.rsplit('/', 1)[-1]} mean {b['mean']:.1f}: " + " ".join(
                f"{row['sizes']}x{row['batches']}" for row in b["buckets"] if row["batches"])
            for key, b in (r.get("batch_sizes") or {}).items())
        if goal := r.get("open_loop"):
            phase = f"{phase}, open loop at {goal['goal_items_per_s']:g}/s: {goal['verdict']}"
        lines.append(
            f"| {_cell(phase)} | {s['items_per_s']:.0f} | {lat.get('p50', 0) * 1000:.0f} | "
            f"{lat.get('p99', 0) * 1000:.0f} | {s['ok']} | {s['error'] + s['timeout']} | "
            f"{s['refused_503']} | {gpu['mean'] if isinstance(gpu, dict) else '-'} | "
            f"{r.get('server_cpu_cores', '-')} | {_cell(spread)} |")
    return lines


def parts_section(parts: dict) -> list[str]:
    lines = []
    for name, data in parts.items():
        if not isinstance(data, dict):
            continue
        text = data.get("headline") or json.dumps(data)[:600]
        lines.append(f"- {name}: {_cell(str(text))}")
    return ["", "## GPU parts (loadtests/bench_gpu_parts.py)", "", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="the steps' own JSON files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="GPU check")
    args = p.parse_args(argv)
    probe = {k: load(args.work / f"{k}.json") for k in PROBE}
    probe["goal"] = load(args.work / "goal.json")  # gpu_load.py's report of the goal step
    (args.out / "probe.json").write_text(json.dumps(probe, indent=1))
    parts = {k: v for k in PARTS if (v := load(args.work / f"{k}.json")) is not None}
    if parts:
        (args.out / "parts.json").write_text(json.dumps(parts, indent=1))
    steps = read_steps(args.steps)
    lines = [f"# {args.title}", "", *step_table(steps, args.work, args.out),
             *tests_section(args.out), *parity_section(probe["parity"]),
             *syncs_section(probe["syncs"]), *raw_section(probe["raw"]),
             *parts_section(parts), *service_section(load(args.out / "service.json")),
             *service_section(probe["goal"], "Issue 18's goal: open loop, several processes")]
    oom = probe["oom"]
    if oom:
        lines += ["", "## Out of memory", "", "```", json.dumps(oom, indent=1)[:2000], "```"]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
