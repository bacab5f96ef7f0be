"""Image prompts for a tiny checkpoint, and transformers' generate on them: the ground truth of
the image tests (tests/test_image_input.py) and of the GPU script's image stage.

`IMAGE_SPEC` is a tiny checkpoint that serves images: the tiny tokenizer's image tokens and a
70-soft-token budget, so an image (about 60 soft tokens) is wider than the window (16). The
reference side uses transformers only: its PIL image processor at the checkpoint's settings,
and the prompt expanded as Gemma 4's processor expands an image token (`boi`, one image token
per soft token, `eoi`), never the plugin's processor.
"""

from __future__ import annotations

import numpy as np

from diffusiongemma_vllm.testing.tiny_checkpoint import TINY_IMAGE_TOKEN_IDS, TINY_IMAGES, TinySpec

IMAGE_SPEC = TinySpec(**TINY_IMAGES)
BOI, IMAGE, EOI = TINY_IMAGE_TOKEN_IDS


def random_image(seed: int, width: int, height: int):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def pixels(images: list, spec: TinySpec = IMAGE_SPEC) -> dict:
    """transformers' PIL image processor at the checkpoint's settings: `pixel_values`,
    `image_position_ids`, `num_soft_tokens_per_image`."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    vision = spec.vision_config()
    processor = Gemma4ImageProcessorPil(patch_size=vision["patch_size"], pooling_kernel_size=vision["pooling_kernel_size"],
                                        max_soft_tokens=spec.soft_tokens_per_image)
    return processor(images=images, return_tensors="pt")


def expanded(prompt: list[int], features: dict | None) -> list[int]:
    """`prompt` with each image token expanded as Gemma 4's processor expands it."""
    counts = iter([] if features is None else features["num_soft_tokens_per_image"].tolist())
    out = []
    for token in prompt:
        out += [BOI, *[IMAGE] * next(counts), EOI] if token == IMAGE else [token]
    return out


def reference_image_generate(model, prompt: list[int], images: list, seed: int, blocks: int, sampler):
    """(expanded prompt, tokens, logprobs [tokens, V]) of transformers' generate on the
    plugin's draws, for a prompt with one IMAGE token per image in `images` (none: text only);
    the logprobs are its halting passes' at temperature 1, the plugin's definition."""
    import torch

    from diffusiongemma_vllm.testing.reference import reference_generate

    features = pixels(images) if images else None
    ids = expanded(prompt, features)
    trace = reference_generate(model, ids, seed, blocks, sampler, images=features)
    logprobs = torch.log_softmax(torch.cat(trace.final_logits).float().cpu(), dim=-1)
    return ids, trace.sequences[0, len(ids):].tolist(), logprobs

# (prompt with one IMAGE token per image, images, seed): an image after a prefix longer than
# the window with text after it; two images, the first at the prompt's start; text only.
IMAGE_REQUESTS = [
    ([2, *range(200, 240), IMAGE, 241, 242], [random_image(0, 30, 20)], 11),
    ([2, IMAGE, 300, 301, IMAGE, 302], [random_image(1, 16, 40), random_image(2, 24, 24)], 12),
    ([2, *range(250, 270)], [], 13),
]
