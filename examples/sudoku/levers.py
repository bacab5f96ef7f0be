"""Measure the training levers: one short run per variant, equal steps, same pool and seed.

Each variant is train.py with one flag changed from the shipped recipe (cells layout,
structured init, symmetry augmentation, no curriculum, 128 wide, 4 deep), trained for the
same number of steps (the schedule spans steps, so runs that share the machine still compare
fairly) on the same puzzle pool, and scored `--evals` times in the run on held-out puzzles
through transformers' generate (train.py's quick evaluation). The augmentation pair trains
on a small pool (10 puzzles per number of givens, 210 in all), where seeing the same puzzles
again is what augmentation changes. The recipe again with another seed (initialisation and
draw order; the same pool) shows how far two runs differ by chance. Prints a table of the
last evaluation (with the last loss and the seconds per step, since width and depth cost
compute) and writes every curve.

    python examples/sudoku/levers.py --out /tmp/levers --steps 250 --evals 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {
    "recipe": [],
    "recipe, seed 1": ["--seed", "1"],  # the run-to-run noise every other row is read against
    "flat layout": ["--layout", "flat"],
    "random init": ["--init", "random"],
    "curriculum 0.5": ["--curriculum", "0.5"],
    "wide (192)": ["--hidden", "192"],
    "deep (6 layers)": ["--layers", "6"],
    "small pool, augmented": ["--pool", "10"],
    "small pool, not augmented": ["--pool", "10", "--no-augment"],
}


def pool_for(variant: list[str], full: dict) -> dict:
    per_givens = int(variant[variant.index("--pool") + 1]) if "--pool" in variant else None
    return {g: pairs[:per_givens] for g, pairs in full.items()}


def train_variant(name: str, args) -> Path:
    run = args.out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    run.mkdir(parents=True, exist_ok=True)
    pool = json.loads((args.out / "pool.json").read_text())
    (run / "pool.json").write_text(json.dumps(pool_for(VARIANTS[name], pool)))
    command = [sys.executable, str(HERE / "train.py"), "--run-dir", str(run), "--steps", str(args.steps),
               "--eval-every", str(max(1, args.steps // args.evals)), "--invalid", "0", "--threads", str(args.threads),
               "--device", args.device, *VARIANTS[name]]
    with open(run / "out.txt", "w") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
    return run


def curve(run: Path) -> dict:
    """The run's evaluations, its mean loss over the last 20 steps and its seconds per step."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    tail = records[-20:]
    return {"evals": [{"step": r["step"], "loss": r["loss"], **r["eval"]} for r in records if "eval" in r],
            "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "seconds_per_step": records[-1]["trained_s"] / records[-1]["step"]}


def main(argv=None) -> None:
    from train import PuzzlePool

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--evals", type=int, default=4, help="held-out evaluations per run")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on the GPU machine")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="a subset of the variants")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    PuzzlePool(args.out / "pool.json", (36, 56), 1000, 0)  # the recipe's pool, shared by every run
    names = args.only or list(VARIANTS)
    with ThreadPoolExecutor(args.parallel) as workers:
        runs = dict(zip(names, workers.map(lambda n: train_variant(n, args), names)))
    results = {name: curve(run) for name, run in runs.items()}
    (args.out / "levers.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"| variant ({args.steps} steps) | loss (last 20) | s/step | solved 40-44 | solved 45-49 | cells 40-44 "
          "| cells 45-49 | passes 45-49 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        last = result["evals"][-1]
        print(f"| {name} | {result['final_loss']:.3f} | {result['seconds_per_step']:.2f} | "
              f"{last['40-44']['solved']:.0%} | {last['45-49']['solved']:.0%} | "
              f"{last['40-44']['cell_accuracy']:.3f} | {last['45-49']['cell_accuracy']:.3f} | "
              f"{last['45-49']['mean_passes']:.1f} |")


if __name__ == "__main__":
    main()
