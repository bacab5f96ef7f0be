"""Solve one Sudoku with the shipped checkpoint through the plugin: the puzzle and the answer as
grids, and the denoise passes taken.

    python examples/sudoku/solve.py "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"

The puzzle is 81 characters, row by row, '.' (or '0') for a blank. A board that breaks the
rules (length, characters, a digit twice in a row, column or box) or has no solution is
refused with the reason before the model is loaded; one with several solutions is solved
with a warning (any rule-abiding grid that keeps the givens counts as solved).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import puzzles  # noqa: E402

MAX_TOKENS = 81  # one token per cell; the invalid-puzzle reply is shorter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("puzzle", help="81 characters, '.' or '0' for blanks")
    parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "checkpoint"))
    parser.add_argument("--max-denoising-steps", type=int,
                        help="pass cap (the temperature schedule spans it); default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    puzzle = args.puzzle.strip().replace("0", puzzles.BLANK)
    problem = puzzles.board_problem(puzzle)
    solutions = puzzles.count_solutions(puzzle) if problem is None else None
    if solutions == 0:
        problem = "it has no solution"
    if problem is not None:
        print(f"not a valid puzzle: {problem}", file=sys.stderr)
        return 2
    if solutions > 1:
        print("warning: this puzzle has more than one solution; any of them counts", file=sys.stderr)
    from vllm import SamplingParams

    from evaluate import open_llm

    from diffusiongemma_vllm.model.config import SamplerConfig

    llm = open_llm(args.checkpoint)
    override = {"max_denoising_steps": args.max_denoising_steps} if args.max_denoising_steps else None
    # The cap the engine applies: the request's override, else the served default.
    cap = SamplerConfig.served_by(llm.llm_engine.model_config).with_request_overrides(override).max_denoising_steps
    out = llm.generate([puzzle + "\n"], SamplingParams(
        max_tokens=MAX_TOKENS, seed=args.seed, extra_args=override))
    reply = out[0].outputs[0].text.strip()
    (passes,) = llm.collective_rpc("diffusion_stats")[0]["canvas_passes"]  # one canvas: {passes: 1}
    print(puzzles.render(puzzle), "\n")
    if len(reply) == 81 and not set(reply) - set(puzzles.DIGITS + puzzles.BLANK):
        print(puzzles.render(reply))
    else:
        print(f"the model replied: {reply!r}")
    verdict = "solved" if puzzles.is_valid_solution(puzzle, reply) else "not solved"
    print(f"\n{verdict} after {passes} denoise passes (cap {cap})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
