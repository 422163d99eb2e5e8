"""Pose benchmark on the built-in garment keypoint task: which backbone serves `fastmae pose` best? OKS AP (pycocotools)
and PCK per epoch for an MAE encoder, a random one and the classifier fine-tuned from the MAE (the route the MAE
paper's readers take: pretrain, fine-tune, then reuse as a backbone), frozen and fine-tuned, with seconds per epoch.

Every row runs the real CLI in this process, `--pose.eval_every 1` so each epoch's AP is logged; the table and a
figure of the AP curves are written at the end. Run on a quiet machine:

    python benchmarks/bench_pose.py --init runs/pretrain --classifier runs/finetune --out runs/bench_pose
        [--rows mae,random,cls,mae-ft,random-ft,cls-ft] [--figure docs/pose_curves.png] -- --optim.epochs 10

Extra `fastmae pose` flags for every row go after `--`. Rows already in OUT/results.json are not run again; rows may
run in two processes side by side (their results are merged).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from fastmae.cli import main as fastmae_main
from fastmae.commands.pose import TASK
from fastmae.figures.curves import epoch_entries, plot_runs

ROWS = {"mae": ("mae", False), "random": ("random", False), "cls": ("cls", False), "mae-ft": ("mae", True),
        "random-ft": ("random", True), "cls-ft": ("cls", True)}
LABELS = {"mae": "MAE, frozen", "random": "random init, frozen", "cls": "fine-tuned classifier, frozen",
          "mae-ft": "MAE, fine-tuned", "random-ft": "random init, fine-tuned",
          "cls-ft": "fine-tuned classifier, fine-tuned"}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the MAE checkpoint or run folder")
    p.add_argument("--classifier", default="", help="a `fastmae finetune` run of that MAE (rows cls, cls-ft)")
    p.add_argument("--out", default="runs/bench_pose")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--figure", default="", help="also write the AP curves here (default: OUT/pose_curves.png)")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    inits = {"mae": a.init, "random": "random", "cls": a.classifier}
    for row in a.rows.split(","):
        if row in results:
            continue
        init, finetune = ROWS[row]
        if not inits[init]:
            raise SystemExit(f"row {row} needs --classifier RUN (a fastmae finetune run)")
        run_dir = out / row
        args = ["pose", "--init", inits[init], "--run.output_dir", str(run_dir), "--pose.eval_every", "1",
                "--run.no_progress", *(["--finetune"] if finetune else []), *extra]
        print("+ fastmae " + " ".join(args), flush=True)
        t0 = time.perf_counter()
        if fastmae_main(args) != 0:
            raise SystemExit(f"fastmae pose failed for row {row}")
        res = json.loads((run_dir / "pose.json").read_text())
        epochs = epoch_entries(run_dir / "log.jsonl")
        row_result = {"ap": res["ap"], "ap50": res["ap50"], "ap75": res["ap75"], "ar": res["ar"],
                      "pck@0.05": res["pck"]["0.05"], "pck@0.1": res["pck"]["0.1"],
                      "ap_per_epoch": [e.get("ap") for e in epochs],
                      "epoch_seconds": statistics.median(e["epoch_seconds"] for e in epochs),
                      "wall_seconds": time.perf_counter() - t0, "epochs": len(epochs)}
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        results[row] = row_result
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(results_path)
    print("| backbone | OKS AP % | AP50 % | AP75 % | AR % | PCK@0.05 % | PCK@0.1 % | s / epoch (median) |\n"
          "|---|---|---|---|---|---|---|---|")
    for row, r in sorted(results.items(), key=lambda kv: list(ROWS).index(kv[0])):
        print(f"| {LABELS[row]} | {r['ap']:.2f} | {r['ap50']:.2f} | {r['ap75']:.2f} | {r['ar']:.2f} | "
              f"{r['pck@0.05']:.2f} | {r['pck@0.1']:.2f} | {r['epoch_seconds']:.0f} |")
    logs = {LABELS[row]: out / row / "log.jsonl" for row in results if (out / row / "log.jsonl").exists()}
    fig = plot_runs(logs, a.figure or out / "pose_curves.png", title="fastmae pose on Fashion-MNIST garments",
                    metric=TASK.metric)
    print(f"figure: {fig}")


if __name__ == "__main__":
    main()
