"""Detection benchmark on Fashion-MNIST scenes: what is MAE pretraining worth to `fastmae detect`? Box mAP and AP50
(pycocotools) per epoch, MAE init against random init, frozen encoder and fine-tuned, with seconds per epoch.

Every row runs the real CLI in this process, `--det.eval_every 1` so each epoch's mAP is logged; the table and a
figure of the four mAP curves are written at the end. Run on a quiet machine:

    python benchmarks/bench_detect.py --init runs/pretrain --out runs/bench_detect [--rows mae,random,mae-ft,random-ft]
        [--figure docs/detect_curves.png] -- --det.train_scenes 2000 --optim.epochs 8

Extra `fastmae detect` flags for every row go after `--`. Rows already in OUT/results.json are not run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from fastmae.cli import main as fastmae_main
from fastmae.commands.detect import TASK
from fastmae.figures.curves import epoch_entries, plot_runs

ROWS = {"mae": ("mae", False), "random": ("random", False), "mae-ft": ("mae", True), "random-ft": ("random", True)}
LABELS = {"mae": "MAE, frozen", "random": "random init, frozen", "mae-ft": "MAE, fine-tuned",
          "random-ft": "random init, fine-tuned"}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the MAE checkpoint or run folder to compare with random init")
    p.add_argument("--out", default="runs/bench_detect")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--figure", default="", help="also write the mAP curves here (default: OUT/detect_curves.png)")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for row in a.rows.split(","):
        if row in results:
            continue
        init, finetune = ROWS[row]
        run_dir = out / row
        args = ["detect", "--init", a.init if init == "mae" else "random", "--run.output_dir", str(run_dir),
                "--det.eval_every", "1", "--run.no_progress", *(["--finetune"] if finetune else []), *extra]
        print("+ fastmae " + " ".join(args), flush=True)
        t0 = time.perf_counter()
        if fastmae_main(args) != 0:
            raise SystemExit(f"fastmae detect failed for row {row}")
        res = json.loads((run_dir / "detect.json").read_text())
        epochs = epoch_entries(run_dir / "log.jsonl")
        row_result = {"map": res["map"], "map50": res["map50"], "map75": res["map75"],
                      "epoch_seconds": statistics.median(e["epoch_seconds"] for e in epochs),
                      "wall_seconds": time.perf_counter() - t0, "epochs": len(epochs)}
        # rows may run in two processes side by side (--rows mae,mae-ft and --rows random,random-ft): merge
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        results[row] = row_result
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(results_path)
    print("| row | box mAP % | AP50 % | AP75 % | s / epoch (median) |\n|---|---|---|---|---|")
    for row, r in sorted(results.items(), key=lambda kv: list(ROWS).index(kv[0])):
        print(f"| {LABELS[row]} | {r['map']:.2f} | {r['map50']:.2f} | {r['map75']:.2f} | {r['epoch_seconds']:.0f} |")
    logs = {LABELS[row]: out / row / "log.jsonl" for row in results if (out / row / "log.jsonl").exists()}
    fig = plot_runs(logs, a.figure or out / "detect_curves.png", title="fastmae detect on Fashion-MNIST scenes",
                    metric=TASK.metric)
    print(f"figure: {fig}")


if __name__ == "__main__":
    main()
