"""The README's playground picture: the shipped checkpoint solving the README's puzzle in the
playground page (GET /playground), served by vLLM with the endpoint plugin, shot in headless
Chromium.

    python examples/sudoku/playground_screenshot.py --out docs/playground.png

Needs Debian's `chromium` (`make browser`) and the [test] extra (websockets). Prints the
passes the canvas took and whether the answer solves the puzzle; a run whose answer does not
solve it writes no picture and exits with 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import puzzles  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
README_PUZZLE = ".6..329.7..7.4651.539..16.23946.8........342621645.8.997.314268.83..57.46427.935."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "checkpoint"))
    parser.add_argument("--puzzle", default=README_PUZZLE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.openai_server import OpenAIServer
    from diffusiongemma_vllm.testing.headless_chromium import HeadlessChromium, chromium_binary

    binary = chromium_binary()
    if binary is None:
        print("no headless Chromium: `make browser` (Debian, as root) installs it", file=sys.stderr)
        return 2
    os.environ["VLLM_PLUGINS"] = "diffusiongemma"  # the endpoint plugin serves /playground
    with tempfile.TemporaryDirectory() as scratch:
        server = OpenAIServer(args.checkpoint, "--max-model-len", "512", log_dir=scratch)
        try:
            query = {"prompt": args.puzzle + "\n", "max_tokens": 81, "draft_every": 1, "seed": args.seed,
                     "autorun": 1}
            browser = HeadlessChromium(binary, os.path.join(scratch, "profile"))
            try:
                browser.call("Page.navigate", url=f"{server.url}/playground?{urlencode(query)}")
                outcome = browser.playground_outcome(timeout=300)
                if outcome["state"] != "done":
                    print(f"the page did not finish: {outcome['status']}", file=sys.stderr)
                    return 1
                answer = outcome["final"].strip()
                solved = puzzles.is_valid_solution(args.puzzle, answer)
                print(f"{outcome['drafts']} drafts (one per pass), {'solved' if solved else 'not solved'}: {answer}")
                if not solved:
                    return 1
                browser.screenshot(args.out)
            finally:
                browser.close()
        finally:
            server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
