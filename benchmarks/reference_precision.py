"""How far transformers agrees with itself across precisions at canvas 256 (random weights).

gpu_e2e's a_fp32 stage measures the engine against transformers' generate on the
`gpu_friendly` checkpoint (canvas 256, random weights) with the plugin's draws, and finds
agreement below 1. This script runs the same requests (e2e_offline.reference_requests(), same
draws) through transformers alone, in fp32 and in fp64 (eager attention and experts, the
only kernels with fp64 on CPU), and prints their agreement: the level at which rounding
alone already changes a trajectory of that checkpoint, the yardstick for the engine's figure.

    .venv/bin/python -m benchmarks.reference_precision --work /tmp/precision
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    from benchmarks.e2e_offline import agreement, checkpoint, reference_tokens
    from benchmarks.gpu_e2e import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/precision", help="where the tiny checkpoint is built")
    parser.add_argument("--checkpoint", default="gpu_friendly", help="an e2e_offline.SPECS name")
    args = parser.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    settings = Settings(cpu=True, work=args.work, out=args.work, attention_backend=None, prompts=1, max_tokens=1,
                        steps=1, bench={})
    model_dir = checkpoint(args.checkpoint, settings)
    fp32, fp64 = ([tokens for tokens, _ in reference_tokens(model_dir, "cpu", dtype, eager=True)]
                  for dtype in ("float32", "float64"))
    print(json.dumps({"checkpoint": args.checkpoint, "transformers_fp32_vs_fp64": [
        agreement(a, b) for a, b in zip(fp32, fp64)]}, indent=1))


if __name__ == "__main__":
    main()
