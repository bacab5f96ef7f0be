"""A request's own canvas: its length, a seeded start, pinned positions, a pass cap, read-only.

vLLM's in-tree DiffusionGemma takes these per request in `extra_args` (`vllm_xargs` in the
OpenAI API), and this module accepts them under the same names, with the same checks:
- `diffusion_canvas_length`: the request's canvases hold this many tokens (at most the
  checkpoint's `canvas_length`); a narrower canvas is denoised in passes of its own length,
  eagerly on a GPU (the denoise graphs serve the checkpoint's length);
- `diffusion_seed_canvas`: the request's first canvas starts from these token ids instead of
  uniform noise; exactly one canvas of ids, each in the vocabulary;
- `diffusion_pinned`: positions of that canvas held at their seed ids through every pass
  (needs a seed): infilling. Their self-conditioning signal is zero, as in vLLM, so the
  model's own guess there does not reach the next pass; the committed canvas holds the seed
  ids there (vLLM commits the model's argmax at every position);
- `diffusion_max_steps`: at most this many passes per canvas, the temperature schedule
  unchanged (`max_denoising_steps` also sets the schedule's length);
- `diffusion_read_only`: the first canvas is the whole reply: `max_tokens` becomes at most a
  canvas and EOS no longer ends it (the request ends with its canvas, never committed);
- `diffusion_constrained`: the request's canvases are read over its `logprob_token_ids` only
  (the allowed set): every pass's argmax, draw, entropy and self-conditioning signal are
  those of the softmax over those ids, as if every other logit were -inf, and its logprobs
  are renormalised over them (denoise/loop.py `Unembedding.restricted`). Re-noise still draws
  from the whole vocabulary, as in vLLM (the model was trained on that noise); a pinned
  position still commits its seed id, in the set or not.
Seeds and pins shape the first canvas only; later canvases start from noise as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

SEED, PINNED, MAX_STEPS, READ_ONLY, WIDTH = ("diffusion_seed_canvas", "diffusion_pinned", "diffusion_max_steps",
                                             "diffusion_read_only", "diffusion_canvas_length")
CONSTRAINED = "diffusion_constrained"
CANVAS_ARGS = (SEED, PINNED, MAX_STEPS, READ_ONLY, WIDTH, CONSTRAINED)


@dataclass(frozen=True)
class CanvasOptions:
    width: int | None = None  # the request's canvas length (None: the checkpoint's)
    seed_canvas: tuple[int, ...] | None = None
    pinned: tuple[int, ...] = ()
    max_steps: int | None = None
    read_only: bool = False
    allowed: tuple[int, ...] = ()  # a constrained read's ids, sorted and distinct; (): the whole vocabulary

    @classmethod
    def from_extra_args(cls, extra_args: dict | None, canvas_length: int, vocab_size: int,
                        logprob_token_ids=None) -> "CanvasOptions":
        """The options in `extra_args` (and the request's `logprob_token_ids`, a constrained
        read's allowed set, checked by the request validator); ValueError naming the first bad one."""
        extra = extra_args or {}
        width = extra.get(WIDTH)
        if width is not None:
            _check(is_int(width) and 0 < width <= canvas_length,
                   f"{WIDTH} must be a positive integer no larger than the served canvas ({canvas_length}), "
                   f"got {width!r}")
        canvas_length = width or canvas_length  # the request's canvas, from here on
        seed = extra.get(SEED)
        if seed is not None:
            _check(isinstance(seed, (list, tuple)) and all(map(is_int, seed)),
                   f"{SEED} must be a list of token ids")
            _check(all(0 <= t < vocab_size for t in seed), f"{SEED} ids must be in [0, {vocab_size})")
            _check(len(seed) == canvas_length, f"{SEED} must hold exactly {canvas_length} ids, got {len(seed)}")
            seed = tuple(seed)
        pinned = extra.get(PINNED)
        if pinned is not None:
            _check(isinstance(pinned, (list, tuple)) and all(map(is_int, pinned)),
                   f"{PINNED} must be a list of canvas positions")
            _check(seed is not None, f"{PINNED} needs a {SEED} to hold")
            _check(all(0 <= p < canvas_length for p in pinned), f"{PINNED} positions must lie inside the canvas "
                   f"[0, {canvas_length})")
        max_steps = extra.get(MAX_STEPS)
        if max_steps is not None:
            _check(is_int(max_steps) and max_steps > 0, f"{MAX_STEPS} must be a positive integer, got {max_steps!r}")
        read_only, constrained = _flag(extra, READ_ONLY), _flag(extra, CONSTRAINED)
        _check(not constrained or bool(logprob_token_ids),
               f"{CONSTRAINED} needs logprob_token_ids: they are the allowed set")
        allowed = tuple(sorted(set(logprob_token_ids))) if constrained else ()
        return cls(width, seed, tuple(sorted(set(pinned or ()))), max_steps, read_only, allowed)


def apply_read_only(sampling_params, canvas_length: int) -> None:
    """Admission: a read-only request ends with its first canvas, whatever EOS it holds. Its
    `min_tokens` must fit that canvas: vLLM checks min_tokens <= max_tokens again wherever it
    decodes the parameters (the engine core's input thread would die of it)."""
    max_tokens = min(sampling_params.max_tokens or canvas_length, canvas_length)
    _check(sampling_params.min_tokens <= max_tokens,
           f"min_tokens={sampling_params.min_tokens} beyond the {max_tokens} tokens of a diffusion_read_only reply")
    sampling_params.max_tokens = max_tokens
    sampling_params.ignore_eos = True


def _flag(extra: dict, name: str) -> bool:
    value = extra.get(name, False)
    # The OpenAI server's vllm_xargs turns JSON booleans into 0/1.
    _check(isinstance(value, (bool, int)) and value in (0, 1), f"{name} must be a boolean (or 0/1), got {value!r}")
    return bool(value)


def is_int(value) -> bool:
    """An integer, not a bool (JSON's true would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
