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
Data: fresh unique-solution puzzles every step (examples/sudoku/puzzles.py), givens drawn
from a range, each with a random validity-preserving relabelling of the digits.

Resumable (`--run-dir` keeps model, optimizer and step), with a progress bar, and writes the
final checkpoint in the release layout with the Sudoku tokenizer.

    python examples/sudoku/train.py --run-dir /tmp/sudoku-run --minutes 45 --out examples/sudoku/checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import puzzles  # noqa: E402
from sudoku_tokenizer import VOCAB_SIZE, build_sudoku_tokenizer, save_sudoku_tokenizer  # noqa: E402

from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec  # noqa: E402

CANVAS = 96  # 81 digits + <eos> + <pad> fill
SPEC = TinySpec(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
                layer_types=("sliding_attention",) * 3 + ("full_attention",), sliding_window=256,
                num_experts=4, top_k_experts=2, moe_intermediate_size=128, max_position_embeddings=512,
                canvas_length=CANVAS, vision_hidden_size=32)


def encode_prompt(tokenizer, puzzle: str) -> list[int]:
    return tokenizer(puzzle + "\n")["input_ids"]


def encode_target(tokenizer, solution: str) -> list[int]:
    ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CANVAS - len(ids))


def relabel(puzzle: str, solution: str, rng: random.Random) -> tuple[str, str]:
    digits = list("123456789")
    rng.shuffle(digits)
    table = str.maketrans("123456789", "".join(digits))
    return puzzle.translate(table), solution.translate(table)


def batch(tokenizer, rng: random.Random, size: int, givens: tuple[int, int]):
    prompts, targets = [], []
    for _ in range(size):
        puzzle, solution = relabel(*puzzles.make_puzzle(rng, rng.randint(*givens)), rng)
        prompts.append(encode_prompt(tokenizer, puzzle))
        targets.append(encode_target(tokenizer, solution))
    return torch.tensor(prompts), torch.tensor(targets)


def diffusion_loss(model, prompts: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    from transformers import DynamicCache

    n = targets.shape[0]
    t = torch.rand(n, 1, generator=generator) * (1 - 1e-3) + 1e-3
    noise = torch.randint(0, VOCAB_SIZE, targets.shape, generator=generator)
    noisy = torch.where(torch.rand(targets.shape, generator=generator) < t, noise, targets)
    cache = DynamicCache(config=model.config.text_config)
    model.model.encoder(input_ids=prompts, past_key_values=cache, use_cache=True)
    sc_logits = None
    if torch.rand((), generator=generator) < 0.5:
        with torch.no_grad():
            sc_logits = model(past_key_values=cache, decoder_input_ids=noisy).logits.detach()
    logits = model(past_key_values=cache, decoder_input_ids=noisy, self_conditioning_logits=sc_logits).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


def build_model(seed: int):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**SPEC.release_config())).float()


def save_checkpoint(model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "config.json").write_text(json.dumps(SPEC.release_config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(SPEC.generation_config(), indent=2) + "\n")
    save_sudoku_tokenizer(out)


def learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="resumable state (model, optimizer, step, log)")
    parser.add_argument("--out", help="write the final checkpoint (release layout) here")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget of this run")
    parser.add_argument("--steps", type=int, default=2400, help="schedule length (cosine decay spans it)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--givens", default="36-56", help="range of givens of training puzzles")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = build_sudoku_tokenizer()
    model = build_model(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step = 0
    if (run / "state.pt").exists():
        state = torch.load(run / "state.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    givens = tuple(int(g) for g in args.givens.split("-"))
    rng = random.Random(args.seed * 1_000_003 + step)
    generator = torch.Generator().manual_seed(args.seed + step)
    deadline = time.time() + 60 * args.minutes
    model.train()
    with tqdm(total=args.steps, initial=step, desc="train") as bar, open(run / "log.jsonl", "a") as log:
        while step < args.steps and time.time() < deadline:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args.steps, args.lr)
            prompts, targets = batch(tokenizer, rng, args.batch, givens)
            loss = diffusion_loss(model, prompts, targets, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.write(json.dumps({"step": step, "loss": loss.item(), "time": time.time()}) + "\n")
            if step % 100 == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                           run / "state.pt")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, run / "state.pt")
    if args.out:
        save_checkpoint(model.eval(), Path(args.out))
        print(f"wrote {args.out} after {step} steps")


if __name__ == "__main__":
    main()
