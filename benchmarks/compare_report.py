"""The report of benchmarks/compare_ar.py: table, goal ratios, plot, and runs merged.

`python benchmarks/compare_report.py RUN.json...` merges compare_ar's JSON lines (its
`--results-json` files; benchmarks/gpu_e2e.py writes one per system) into one table per mode
(offline, server) with issue 11's goals: the plugin's output tokens/s at least 1.5x vLLM's
in-tree DiffusionGemma at concurrency 1 and 2x at 16 and 64, at least 3x AR Gemma 4 at 1
(16 passes per canvas), and where AR overtakes. A goal whose numbers are missing says so and
why (a system that failed, or was not run); it is never counted as met.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# (system, baseline, concurrency, least ratio of output tokens/s): issue 11's goals.
GOALS = (("plugin", "in-tree", 1, 1.5), ("plugin", "in-tree", 16, 2.0), ("plugin", "in-tree", 64, 2.0),
         ("plugin", "ar", 1, 3.0))


def plot(results: dict, path: Path) -> str | None:
    """The PNG's path, or None without results or matplotlib (the numbers matter more)."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed")
        return None
    if not results:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for system, levels in results.items():
        xs = sorted(int(c) for c in levels)
        left.plot(xs, [levels[str(c)]["output_tokens_per_s"] for c in xs], marker="o", label=system)
        passes = [p for c in xs for p in levels[str(c)]["passes_per_canvas"]]
        if passes:
            right.hist(passes, bins=range(1, max(passes) + 2), alpha=0.6, label=system)
    left.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput")
    levels = sorted({int(c) for system in results.values() for c in system})
    left.set_xticks(levels, [str(c) for c in levels])
    left.minorticks_off()
    right.set(xlabel="denoise passes per canvas", ylabel="canvases", title="Passes to halt")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def table(results: dict) -> str:
    header = f"{'system':14} {'conc':>4} {'tok/s':>9} {'req tok/s':>9} {'TTFT p50':>9} {'lat p50':>8} " \
             f"{'lat p99':>8} {'pass/canvas':>11} {'pass/token':>10}"
    lines = [header, "-" * len(header)]
    for system, levels in results.items():
        for c in sorted(levels, key=int):
            r = levels[c]
            passes = r["passes_per_canvas"]
            per_canvas = f"{np.mean(passes):.1f}" if passes else "-"
            per_token = f"{r['passes_per_output_token']:.3f}" if r["passes_per_output_token"] else "-"
            lines.append(f"{system:14} {c:>4} {r['output_tokens_per_s']:9.1f} {r['per_request_tokens_per_s']:9.1f} "
                         f"{r['ttft_p50_s']:9.3f} {r['latency_p50_s']:8.3f} {r['latency_p99_s']:8.3f} "
                         f"{per_canvas:>11} {per_token:>10}")
    return "\n".join(lines)


def ratios(results: dict, system: str, baseline: str) -> dict:
    ours, theirs = results.get(system, {}), results.get(baseline, {})
    return {c: ours[c]["output_tokens_per_s"] / theirs[c]["output_tokens_per_s"]
            for c in sorted(ours, key=int) if c in theirs}


def goals(results: dict, failures: dict) -> list[dict]:
    """Issue 11's goals against these results; a missing number is reported as such."""
    rows = []
    for system, baseline, level, target in GOALS:
        ratio = ratios(results, system, baseline).get(str(level))
        row = {"goal": f"{system} >= {target}x {baseline} output tok/s at c={level}", "target": target}
        if ratio is None:
            why = failures.get(baseline) or failures.get(system) or "not measured in this run"
            rows.append({**row, "status": "missing", "why": why})
        else:
            rows.append({**row, "measured": round(ratio, 2), "status": "met" if ratio >= target else "not met"})
    over = [int(c) for c, r in ratios(results, "plugin", "ar").items() if r < 1]
    rows.append({"goal": "where AR overtakes the plugin (output tok/s)",
                 "measured": f"c={min(over)}" if over else "nowhere in the levels measured",
                 "status": "reported" if "ar" in results and "plugin" in results else "missing"})
    return rows


def print_report(results: dict, failures: dict) -> list[dict]:
    print(table(results))
    for baseline in ("ar", "in-tree"):
        if "plugin" in results and baseline in results:
            print(f"plugin / {baseline} output tokens/s:",
                  ", ".join(f"c={c}: {r:.2f}x" for c, r in ratios(results, "plugin", baseline).items()))
    rows = goals(results, failures)
    for row in rows:
        measured = row.get("measured", "-")
        print(f"goal: {row['goal']}: {row['status']} ({measured}{'x' if isinstance(measured, float) else ''})"
              + (f"; {row['why']}" if "why" in row else ""))
    for system, why in failures.items():
        print(f"failed: {system}: {why}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN.json", help="compare_ar.py --results-json files")
    parser.add_argument("--out-dir", default=".", help="the plots go here")
    parser.add_argument("--results-json", help="also write the final JSON line to this file")
    args = parser.parse_args(argv)
    runs = [json.loads(Path(f).read_text().strip().splitlines()[-1]) for f in args.runs]
    modes = {}
    for run in runs:
        merged = modes.setdefault(run["mode"], {"results": {}, "failures": {}, "skipped": {}, "models": {}})
        for key in ("results", "failures", "skipped", "models"):
            merged[key].update(run.get(key) or {})
    for mode, merged in modes.items():
        print(f"== {mode} ==")
        merged["goals"] = print_report(merged["results"], merged["failures"])
        merged["table"] = table(merged["results"])
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        merged["plot"] = plot(merged["results"], Path(args.out_dir) / f"compare_ar-report-{mode}.png")
    machine = runs[0].get("machine") if runs else None
    line = json.dumps({"machine": machine, "report": modes, "files": args.runs})
    if args.results_json:
        Path(args.results_json).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
