"""Solve one Sudoku with the shipped checkpoint through the plugin, and show the passes taken.

    python examples/sudoku/solve.py "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import puzzles  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("puzzle", help="81 characters, '.' for blanks")
    parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "checkpoint"))
    parser.add_argument("--max-denoising-steps", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.puzzle) != 81 or set(args.puzzle) - set("123456789."):
        parser.error("the puzzle must be 81 characters of 1-9 and '.'")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.checkpoint, dtype="float32", max_model_len=256, enforce_eager=True)
    out = llm.generate([args.puzzle + "\n"], SamplingParams(
        max_tokens=81, seed=args.seed, extra_args={"max_denoising_steps": args.max_denoising_steps}))
    board = (out[0].outputs[0].text.strip() + "." * 81)[:81]
    (passes,) = llm.collective_rpc("diffusion_stats")[0]["canvas_passes"]  # one canvas: {passes: 1}
    print(puzzles.render(args.puzzle), "\n")
    print(puzzles.render(board))
    verdict = "solved" if puzzles.is_valid_solution(args.puzzle, board) else "not solved"
    print(f"\n{verdict} after {passes} denoise passes (cap {args.max_denoising_steps})")


if __name__ == "__main__":
    main()
