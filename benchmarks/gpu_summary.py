"""Summary of one `benchmarks/gpu_check.sh` run: which parts ran, the CUDA tests, model and loader speed.

Reads what the parts left in the output folder (pytest_cuda.xml, bench_pretrain.json, bench_finetune.json,
bench_data.json; any may be missing when a part failed or ran out of time) and writes summary.json and
summary.md there. The loader's images/s stand next to each model's, so the loader-or-model question is
answered for the same machine:

    python benchmarks/gpu_summary.py --out gpu_out --part tests=0:95:150 --part pretrain=124:210:210
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIMED_OUT = (124, 137)  # `timeout`'s exit codes: TERM after the limit, KILL after --kill-after


def parse_part(spec: str) -> dict:
    """'name=rc:seconds:limit' (rc 'skipped' when the script had no time left for the part) -> a dict."""
    name, _, rest = spec.partition("=")
    rc, seconds, limit = (rest.split(":") + ["", "", ""])[:3]
    part = {"name": name, "seconds": int(seconds or 0), "limit_s": int(limit or 0)}
    if rc == "skipped":
        return {**part, "rc": None, "status": "skipped (time budget spent)"}
    code = int(rc)
    status = "ok" if code == 0 else ("timed out" if code in TIMED_OUT else f"failed (exit {code})")
    return {**part, "rc": code, "status": status}


def read_json(path: Path) -> dict | None:
    """A part's JSON, or None when the part wrote none (or an unreadable one)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def junit_summary(path: Path) -> dict | None:
    """Counts and the failing/erroring test names from a pytest junit XML file; None when there is none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    skipped = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase") if c.find("skipped") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_tests": bad, "skipped_tests": skipped}


def model_rows(bench: dict | None) -> list[dict]:
    """The speed rows of a bench_model JSON, reduced to what the summary shows."""
    if not bench:
        return []
    keep = ("case", "precision", "impl", "batch", "batch_requested", "img_per_s", "step_s_median", "tflops", "mfu",
            "peak_mem_gib", "vs_hf", "first_step_s")
    return [{k: r[k] for k in keep if k in r} for r in bench.get("rows", [])]


def loader_rate(data: dict | None) -> float | None:
    """The JPEG loader's training images/s (the row with the most workers)."""
    rows = [r for r in (data or {}).get("rows", []) if r.get("pipeline") == "J"]
    return max(rows, key=lambda r: r["workers"])["img_per_s"] if rows else None


def bound_by(model_ips: float, loader_ips: float | None) -> str:
    """Which side limits training at this speed: the loader when it delivers fewer images/s than the model uses."""
    if loader_ips is None:
        return "-"
    return "loader" if loader_ips < model_ips else "model"


def summarize(out: Path, parts: list[dict]) -> dict:
    """Everything the summary files hold, from the files in `out`."""
    pre, ft = read_json(out / "bench_pretrain.json"), read_json(out / "bench_finetune.json")
    data = read_json(out / "bench_data.json")
    machine = next((b["machine"] for b in (pre, ft) if b), {})
    loader = loader_rate(data)
    rows = model_rows(pre) + model_rows(ft)
    for r in rows:
        r["loader_img_per_s"] = loader
        r["bound_by"] = bound_by(r["img_per_s"], loader)
    peaks = next((b.get("peaks_tflops") for b in (pre, ft) if b and b.get("peaks_tflops")), {})
    return {"machine": machine, "parts": parts, "tests": junit_summary(out / "pytest_cuda.xml"),
            "matmul_peak_tflops": peaks, "loader": (data or {}).get("rows", []), "models": rows,
            "ok": all(p["status"] == "ok" for p in parts)}


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(s: dict) -> str:
    """summary.md: parts, tests, the speed table with the loader next to it."""
    m = s["machine"]
    lines = [f"# GPU check: {m.get('gpu', 'no GPU recorded')}", "",
             f"torch {m.get('torch', '?')}, CUDA {m.get('cuda', '?')}, transformers {m.get('transformers', '-')}; "
             f"bf16 matmul peak {fmt(s['matmul_peak_tflops'].get('bf16'), '.0f')} TFLOP/s (measured in the run)", "",
             "| part | status | seconds | limit |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} | {p['limit_s']} |" for p in s["parts"]]
    t = s["tests"]
    lines += ["", "## CUDA tests", ""]
    if t is None:
        lines.append("no junit XML (the test part did not finish)")
    else:
        lines.append(f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        lines += [f"- FAILED {name}" for name in t["failed_tests"]]
        lines += [f"- skipped {name}" for name in t["skipped_tests"]]
    lines += ["", "## Train step speed and the data loader", "",
              "| case | precision | impl | batch | img/s | ms/step | peak GiB | TFLOP/s | MFU | vs HF | loader img/s "
              "| bound by |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in s["models"]:
        vs = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
        lines.append(f"| {r['case']} | {r['precision']} | {r['impl']} | {r['batch']} | {r['img_per_s']:.0f} | "
                     f"{1e3 * r['step_s_median']:.1f} | {fmt(r.get('peak_mem_gib'), '.1f')} | {r['tflops']:.1f} | "
                     f"{mfu} | {vs} | {fmt(r['loader_img_per_s'])} | {r['bound_by']} |")
    if not s["models"]:
        lines.append("| (no model timings: see the parts above and gpu_check.log) ||||||||||||")
    lines += ["", "Loader: " + ("; ".join(f"{r['title']}: {r['img_per_s']:.0f} img/s" for r in s["loader"])
                                or "not measured")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder gpu_check.sh wrote into")
    p.add_argument("--part", action="append", default=[], help="name=rc:seconds:limit, once per part, in order")
    args = p.parse_args(argv)
    out = Path(args.out)
    s = summarize(out, [parse_part(x) for x in args.part])
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    text = markdown(s)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
