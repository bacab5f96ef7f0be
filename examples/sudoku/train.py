"""Train a small DiffusionGemma to solve Sudoku with the uniform-state diffusion objective.

The model is exactly DiffusionGemma's architecture (transformers' DiffusionGemmaForBlockDiffusion
built from the release-layout config of `diffusiongemma_vllm.testing.tiny_checkpoint`), so the plugin
serves the result with no special casing. Objective (research/sudoku.md section 1.4, small):
- prompt `<bos>` + the 81-character puzzle ('.' = blank) + newline, clean, through the causal
  encoder (which fills the KV cache the canvas reads);
- canvas target: the 81 solution digits, `<eos>`, then `<pad>` to the canvas length;
- per example t ~ U(eps, 1): every canvas token is replaced with probability t by a token
  drawn uniformly from the whole vocabulary (no mask token);
- self-conditioning with probability 0.5: a first decoder pass without gradient, whose
  logits feed the second pass; cross-entropy on every canvas position of the second pass.

The levers (README "Levers"), each a flag:
- `--layout`: `cells` tokens name their cell (row, column and box come from the token),
  `flat` tokens are bare characters (sudoku_tokenizer.py);
- `--init structured`: the embedding of "cell i holds d" starts as the sum of a row, a
  column, a box and a digit vector (a starting point only; every entry trains freely);
- `--hidden`, `--layers`: width and depth;
- `--minutes`: training length (the learning-rate schedule spans the wall-clock budget);
  `--steps` spans a number of steps instead, which compares runs fairly when they share the
  machine with other work;
- `--augment`: each draw from the puzzle pool is moved by a random element of the Sudoku
  symmetry group (digits, rows in a band, columns in a stack, bands, stacks, transpose);
- `--curriculum F`: over the first fraction F of the budget, the fewest givens drawn falls
  from the top of `--givens` to its bottom.
`--invalid` teaches the answer to a request that is not a valid puzzle: broken boards (a
digit twice in a unit, a character that is no cell) and text of another length get
puzzles.INVALID_REPLY as their canvas.
Every `--eval-every` steps the model solves a fixed held-out set through transformers' own
`generate` (the reference sampler, release settings); the log keeps loss and those scores.

`--init-from CHECKPOINT` starts from a trained checkpoint's weights (a fresh optimizer and
schedule): training continues past an earlier run whose run directory is gone. With more
`--layers` than the checkpoint has, the checkpoint grows deeper and starts as the same function
(load_weights).
Resumable (`--run-dir` keeps model, optimizer, step, trained seconds, pool and log) and writes
the final checkpoint in the release layout with the Sudoku tokenizer. Runs on CPU (the default)
or, with `--device cuda`, on a GPU. `--workers N` splits each batch over N processes
(data_parallel.py); on a 2-core CPU `--workers 2 --threads 1` trains faster than one process
with two threads.

    python examples/sudoku/train.py --run-dir /tmp/sudoku-run --minutes 90 --out examples/sudoku/checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_parallel  # noqa: E402
import puzzles  # noqa: E402
from sudoku_tokenizer import (  # noqa: E402
    CELL_CHARACTERS, CELLS, LAYOUTS, VOCAB_SIZES, build_sudoku_tokenizer, cell_token, save_sudoku_tokenizer,
    standalone_ids)

from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec  # noqa: E402

CANVAS = 88  # 81 cells + <eos> + <pad> fill
TRAIN_SEED = 0  # pool seeds derive from it; evaluate.py's held-out seed is far from all of them


# The sampler the checkpoint is served with (its generation_config.json; evaluate.py --sweep and
# README "Sampler defaults"): hot to cold over at most 16 passes, where the release goes from
# 0.8 to 0.4 over 48. A wrong board the model is sure of halts at the release's temperatures;
# sampling hotter early shakes it loose.
SAMPLER = {"max_denoising_steps": 16, "t_max": 1.5, "t_min": 0.4}


def model_spec(layout: str, hidden: int = 128, layers: int = 4) -> TinySpec:
    """The release architecture at Sudoku size: 4 query heads, one full-attention layer last."""
    return TinySpec(vocab_size=VOCAB_SIZES[layout], hidden_size=hidden, intermediate_size=2 * hidden,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, global_head_dim=hidden // 2,
                    num_global_key_value_heads=1,
                    layer_types=("sliding_attention",) * (layers - 1) + ("full_attention",),
                    sliding_window=256, num_experts=4, top_k_experts=2, moe_intermediate_size=hidden,
                    max_position_embeddings=512, canvas_length=CANVAS, vision_hidden_size=32, generation=SAMPLER)


def encode_prompt(tokenizer, puzzle: str) -> list[int]:
    return tokenizer(puzzle + "\n")["input_ids"]


def encode_target(tokenizer, solution: str, layout: str) -> list[int]:
    """The reply: the 81 digits as standalone characters (in both layouts: the canvas finds
    each cell's place by reading the prompt, whose tokens name it)."""
    return pad_canvas(tokenizer, standalone_ids(solution, layout))


def encode_invalid_reply(tokenizer, layout: str) -> list[int]:
    return pad_canvas(tokenizer, standalone_ids(puzzles.INVALID_REPLY, layout))


def pad_canvas(tokenizer, ids: list[int]) -> list[int]:
    ids = ids + [tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CANVAS - len(ids))


class PuzzlePool:
    """Unique-solution puzzles by number of givens, generated once per run and kept on disk."""

    def __init__(self, path: Path, givens: tuple[int, int], per_givens: int, seed: int):
        if path.exists():
            self.by_givens = {int(g): pairs for g, pairs in json.loads(path.read_text()).items()}
            return
        self.by_givens = {g: puzzles.generate_dataset(seed * 1_000 + g, per_givens, (g, g))
                          for g in range(givens[0], givens[1] + 1)}
        path.write_text(json.dumps(self.by_givens))

    def draw(self, rng: random.Random, givens: int, augment: bool) -> tuple[str, str]:
        puzzle, solution = rng.choice(self.by_givens[givens])
        if not augment:
            return puzzle, solution
        symmetry = puzzles.random_symmetry(rng)
        return puzzles.apply_symmetry(puzzle, symmetry), puzzles.apply_symmetry(solution, symmetry)


def fewest_givens(progress: float, givens: tuple[int, int], curriculum: float) -> int:
    """The lowest number of givens drawn at `progress` (0..1) of the budget."""
    if curriculum <= 0 or progress >= curriculum:
        return givens[0]
    return round(givens[1] - (givens[1] - givens[0]) * progress / curriculum)


NOT_CELLS = "abcxyz#*- _/"  # characters a user may type that are no cell


def invalid_board(rng: random.Random, puzzle: str) -> str:
    """`puzzle` broken: mostly a clash (a cell takes a digit given elsewhere in one of its
    units), else a character that is no cell."""
    cells = list(puzzle)
    i = rng.randrange(CELLS)
    digits = [puzzle[j] for unit in puzzles.UNITS if i in unit for j in unit if j != i and puzzle[j] != puzzles.BLANK]
    cells[i] = rng.choice(digits) if digits and rng.random() < 0.75 else rng.choice(NOT_CELLS)
    return "".join(cells)


def malformed_text(rng: random.Random, length: int) -> str:
    """Text that is not 81 cells long: board characters, with a few others mixed in."""
    return "".join(rng.choice(CELL_CHARACTERS) if rng.random() < 0.9 else rng.choice(NOT_CELLS) for _ in range(length))


def batch(tokenizer, layout: str, pool: PuzzlePool, rng: random.Random, size: int, givens: tuple[int, int],
          augment: bool, invalid: float):
    """`size` training examples. A fraction `invalid` of boards are broken (`invalid_board`), and
    a fraction `invalid` of batches are all `malformed_text` of one length: those teach the
    reply puzzles.INVALID_REPLY."""
    reply = encode_invalid_reply(tokenizer, layout)
    if rng.random() < invalid:
        length = rng.choice([n for n in range(2 * CELLS) if n != CELLS])
        prompts = [encode_prompt(tokenizer, malformed_text(rng, length)) for _ in range(size)]
        return torch.tensor(prompts), torch.tensor([reply] * size)
    prompts, targets = [], []
    for _ in range(size):
        puzzle, solution = pool.draw(rng, rng.randint(*givens), augment)
        if rng.random() < invalid:
            prompts.append(encode_prompt(tokenizer, invalid_board(rng, puzzle)))
            targets.append(reply)
        else:
            prompts.append(encode_prompt(tokenizer, puzzle))
            targets.append(encode_target(tokenizer, solution, layout))
    return torch.tensor(prompts), torch.tensor(targets)


def diffusion_loss(model, prompts: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    from transformers import DynamicCache

    vocab = model.config.text_config.vocab_size
    n = targets.shape[0]
    device = targets.device
    t = torch.rand(n, 1, generator=generator, device=device) * (1 - 1e-3) + 1e-3
    noise = torch.randint(0, vocab, targets.shape, generator=generator, device=device)
    noisy = torch.where(torch.rand(targets.shape, generator=generator, device=device) < t, noise, targets)
    cache = DynamicCache(config=model.config.text_config)
    model.model.encoder(input_ids=prompts, past_key_values=cache, use_cache=True)
    sc_logits = None
    if torch.rand((), generator=generator, device=device) < 0.5:
        with torch.no_grad():
            sc_logits = model(past_key_values=cache, decoder_input_ids=noisy).logits.detach()
    logits = model(past_key_values=cache, decoder_input_ids=noisy, self_conditioning_logits=sc_logits).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))


def build_model(seed: int, spec: TinySpec):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**spec.release_config())).float()


LANGUAGE_LAYER = re.compile(r"((?:decoder|language_model)\.layers\.)(\d+)\.")


def load_weights(model, checkpoint: Path) -> None:
    """Copy a release-layout checkpoint's weights into `model`, which must have its width and
    layout and at least its depth.

    A deeper `model` grows the checkpoint without changing what it computes: the checkpoint's
    last (full-attention) layer stays last, and the layers inserted before it keep their fresh
    weights but start with zero post-attention and post-feed-forward norm scales, so each adds
    nothing to the residual stream until training moves those scales.
    """
    from transformers import DiffusionGemmaForBlockDiffusion

    trained = DiffusionGemmaForBlockDiffusion.from_pretrained(str(checkpoint), dtype=torch.float32)
    source = trained.config.text_config.num_hidden_layers
    target = model.config.text_config.num_hidden_layers
    if target < source:
        raise SystemExit(f"{checkpoint} has {source} layers, more than this model's {target} (--layers)")

    def moved(name: str) -> str:
        return LANGUAGE_LAYER.sub(lambda m: f"{m[1]}{target - 1}." if int(m[2]) == source - 1 else m[0], name, 1)

    state = model.state_dict()
    state.update({moved(name): tensor for name, tensor in trained.state_dict().items()})
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise SystemExit(f"{checkpoint} does not fit this model (--layout, --hidden, --layers): {error}") from None
    with torch.no_grad():
        for layer in model.model.decoder.layers[source - 1:target - 1]:  # the encoder shares these weights
            layer.post_attention_layernorm.weight.zero_()
            layer.post_feedforward_layernorm.weight.zero_()


def structure_embeddings(model, tokenizer, seed: int) -> None:
    """Start "cell i holds d" at row(i) + column(i) + box(i) + content(d) (layout `cells`).

    Each part is drawn with half the initializer's deviation, so the sum has its scale.
    """
    embedding = model.get_input_embeddings().weight
    std = model.config.text_config.initializer_range / 2
    generator = torch.Generator().manual_seed(seed)
    parts = {name: torch.randn(count, embedding.shape[1], generator=generator) * std
             for name, count in (("row", 9), ("col", 9), ("box", 9), ("content", len(CELL_CHARACTERS)))}
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        for i in range(CELLS):
            position = (parts["row"][puzzles.ROW_OF[i]] + parts["col"][puzzles.COL_OF[i]]
                        + parts["box"][puzzles.BOX_OF[i]])
            for k, ch in enumerate(CELL_CHARACTERS):
                embedding[vocab[cell_token(i, ch)]] = position + parts["content"][k]


def save_checkpoint(model, spec: TinySpec, layout: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "config.json").write_text(json.dumps(spec.release_config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(spec.generation_config(), indent=2) + "\n")
    save_sudoku_tokenizer(out, layout)


def learning_rate(progress: float, step: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then cosine towards 10% over the budget."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def quick_eval(model, tokenizer, per_bucket: int) -> dict:
    """Solved fraction, blank-cell accuracy and passes on held-out puzzles (transformers' generate
    with the release's sampler, 48 passes, which every run's training curve has used)."""
    import evaluate

    model.eval()
    scores = {}
    for bucket, pairs in evaluate.held_out(per_bucket, buckets=((40, 44), (45, 49))).items():
        result = evaluate.transformers_answers(model, tokenizer, pairs, max_steps=48)
        scores[f"{bucket[0]}-{bucket[1]}"] = {k: round(v, 3) for k, v in result.items()}
    model.train()
    return scores


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="resumable state (model, optimizer, step, pool, log)")
    parser.add_argument("--out", help="write the final checkpoint (release layout) here")
    parser.add_argument("--minutes", type=float, default=90.0, help="wall-clock training budget (spans the schedule)")
    parser.add_argument("--steps", type=int, help="budget in steps instead of minutes")
    parser.add_argument("--init-from", type=Path,
                        help="start from this checkpoint's weights (same width and layout; a shallower one grows)")
    parser.add_argument("--layout", choices=LAYOUTS, default="cells")
    parser.add_argument("--init", choices=("structured", "random"), default="structured")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--givens", default="36-56", help="range of givens of training puzzles")
    parser.add_argument("--pool", type=int, default=1000, help="pool puzzles per number of givens")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--invalid", type=float, default=0.03,
                        help="fraction of broken boards, and of batches of malformed text (INVALID_REPLY)")
    parser.add_argument("--curriculum", type=float, default=0.0, help="fraction of the budget the curriculum spans")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations (0: never)")
    parser.add_argument("--eval-puzzles", type=int, default=32, help="held-out puzzles per bucket")
    parser.add_argument("--threads", type=int, default=2, help="threads per worker")
    parser.add_argument("--workers", type=int, default=1,
                        help="data-parallel processes (data_parallel.py); each draws batch / workers puzzles")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on the GPU machine")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED)
    args = parser.parse_args(argv)
    if args.workers < 1 or args.batch % args.workers:
        parser.error(f"--batch {args.batch} does not split evenly over --workers {args.workers}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "args.json").write_text(json.dumps(vars(args), indent=1, default=str))
    PuzzlePool(run / "pool.json", givens_range(args), args.pool, args.seed)  # generated once, before any worker
    if args.workers == 1:
        train(0, args, None)
    else:
        torch.multiprocessing.spawn(train, args=(args, data_parallel.free_port()), nprocs=args.workers)


def givens_range(args) -> tuple[int, int]:
    low, high = args.givens.split("-")
    return int(low), int(high)


def train(rank: int, args, port: int | None) -> None:
    """One worker's training loop; worker 0 evaluates, logs and writes the state and checkpoint."""
    from tqdm import tqdm

    if port is not None:
        data_parallel.join(rank, args.workers, port)
    lead = rank == 0
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    givens = givens_range(args)
    tokenizer = build_sudoku_tokenizer(args.layout)
    spec = model_spec(args.layout, args.hidden, args.layers)
    model = build_model(args.seed, spec)
    if args.init_from:
        load_weights(model, args.init_from)
    elif args.layout == "cells" and args.init == "structured":
        structure_embeddings(model, tokenizer, args.seed)
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, trained_s = 0, 0.0
    if (run / "state.pt").exists():
        state = torch.load(run / "state.pt", map_location=args.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, trained_s = state["step"], state["trained_s"]
    pool = PuzzlePool(run / "pool.json", givens, args.pool, args.seed)
    # Each worker its own draws; one worker draws exactly what a run without --workers draws.
    rng = random.Random((args.seed * 1_000_003 + step) * args.workers + rank)
    generator = torch.Generator(args.device).manual_seed((args.seed + step) * args.workers + rank)
    parameters = list(model.parameters())
    budget_s = 60 * args.minutes

    def save() -> None:
        if args.workers > 1:
            data_parallel.check_in_sync(parameters)
        if lead:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "trained_s": trained_s}, run / "state.pt")

    model.train()
    with tqdm(total=round(budget_s), initial=round(trained_s), unit="s", desc="train", disable=not lead) as bar, \
            open(run / "log.jsonl", "a") if lead else contextlib.nullcontext() as log:
        while (step < args.steps) if args.steps else (trained_s < budget_s):
            started = time.time()
            progress = step / args.steps if args.steps else trained_s / budget_s
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(progress, step, args.lr)
            low = fewest_givens(progress, givens, args.curriculum)
            prompts, targets = batch(tokenizer, args.layout, pool, rng, args.batch // args.workers,
                                     (low, givens[1]), args.augment, args.invalid)
            loss = diffusion_loss(model, prompts.to(args.device), targets.to(args.device), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss = loss.item()
            if args.workers > 1:
                data_parallel.average_gradients(parameters)
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            step += 1
            elapsed = time.time() - started
            if args.workers > 1:  # every worker keeps the same clock and reports the mean loss
                elapsed, loss = data_parallel.largest(elapsed), data_parallel.mean(loss)
            trained_s += elapsed
            record = {"step": step, "trained_s": round(trained_s, 1), "loss": round(loss, 4)}
            last = step == args.steps if args.steps else trained_s >= budget_s
            if args.eval_every and (step % args.eval_every == 0 or last):
                if lead:
                    record["eval"] = quick_eval(model, tokenizer, args.eval_puzzles)
                save()  # after the evaluation: the other workers wait here, off the clock
            if lead:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(round(trained_s) - bar.n)
            bar.set_postfix(step=step, loss=f"{loss:.3f}")
    save()
    if args.out and lead:
        save_checkpoint(model.eval().cpu(), spec, args.layout, Path(args.out))
        print(f"wrote {args.out} after {step} steps, {trained_s / 60:.1f} min")
    if args.workers > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
