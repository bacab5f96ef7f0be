"""Image prompts for vLLM's multimodal input processing, without transformers' Gemma 4 processor.

vLLM turns a prompt's images into model inputs through a processor registered on the model
class. Gemma 4's (transformers' `Gemma4Processor`, which vLLM's Gemma 4 and in-tree
DiffusionGemma use) imports torchvision, which a CPU install of torch 2.13 cannot have. This
one calls transformers' PIL image processor (`Gemma4ImageProcessorPil`), the same
resizing, patching and padding, and does the prompt expansion itself:
- each `<|image|>` token of the prompt becomes `boi`, N soft tokens (`image_token_id`), `eoi`,
  N being the image's soft-token count at its aspect-preserving size (at most
  `max_soft_tokens`: the checkpoint's `vision_config.default_output_length`, else
  `vision_soft_tokens_per_image`, else 280; one of 70, 140, 280, 560, 1120, settable with
  `--mm-processor-kwargs '{"max_soft_tokens": 560}'` or per request up to that);
- only the soft tokens take image embeddings (vLLM's `is_embed`), as transformers'
  `mm_token_type_ids` marks only them;
- the processor's `pixel_values` and `image_position_ids` reach the model
  (`embed_multimodal`) as `pixel_values` and `pixel_position_ids`.
Images only: video and audio are refused at admission by vLLM ("At most 0 video(s)").
The patch size and pooling kernel come from the checkpoint's vision config, overridden by its
saved image-processor config (`processor_config.json` or `preprocessor_config.json`), if any.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cached_property

from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import BaseDummyInputsBuilder
from vllm.multimodal.processing.processor import (BaseMultiModalProcessor, BaseProcessingInfo, PromptReplacement,
                                                  PromptUpdateDetails)

SOFT_TOKEN_CHOICES = (70, 140, 280, 560, 1120)  # the only budgets Gemma 4's image processor accepts
IMAGE_PLACEHOLDER = "<|image|>"  # Gemma 4's image token, which chat templates insert per image
# The image-processor settings a saved processor config may set.
_PROCESSOR_KEYS = ("do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                   "image_mean", "image_std", "patch_size", "pooling_kernel_size", "max_soft_tokens")


def default_max_soft_tokens(hf_config) -> int:
    vision = hf_config.vision_config
    return int(getattr(vision, "default_output_length", None) or getattr(hf_config, "vision_soft_tokens_per_image", None)
               or 280)


class ImageProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_hf_processor(self, **kwargs):
        raise NotImplementedError("DiffusionGemma's images go through Gemma4ImageProcessorPil (image_processing.py), "
                                  "not transformers' Gemma4Processor, which needs torchvision")

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": {"max_soft_tokens"}}

    @cached_property
    def image_processor(self):
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        hf_config = self.get_hf_config()
        vision = hf_config.vision_config
        settings = {"patch_size": vision.patch_size, "pooling_kernel_size": vision.pooling_kernel_size,
                    "max_soft_tokens": default_max_soft_tokens(hf_config)}
        saved = self.ctx.get_hf_image_processor_config() or {}
        settings |= {key: value for key, value in saved.items() if key in _PROCESSOR_KEYS}
        settings |= self.configured_kwargs()
        return Gemma4ImageProcessorPil(**settings)

    def configured_kwargs(self) -> dict:
        """The server's `--mm-processor-kwargs`, checked."""
        budget = _soft_token_budget(self.ctx.get_merged_mm_kwargs({}), "--mm-processor-kwargs")
        return {} if budget is None else {"max_soft_tokens": budget}

    def max_soft_tokens(self, request_kwargs: Mapping[str, object] = {}) -> int:
        """A request's soft-token budget per image: its `max_soft_tokens`, at most the server's."""
        served = self.image_processor.max_soft_tokens
        asked = _soft_token_budget(request_kwargs, "mm_processor_kwargs")
        if asked is not None and asked > served:
            raise ValueError(f"max_soft_tokens={asked} is above the server's {served} (start the server with "
                             f"--mm-processor-kwargs '{{\"max_soft_tokens\": {asked}}}' to allow it)")
        return served if asked is None else asked

    def num_soft_tokens(self, width: int, height: int, max_soft_tokens: int) -> int:
        """Soft tokens of a width x height image: its patches at the processor's
        aspect-preserving size, pooled."""
        from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

        processor = self.image_processor
        patch, kernel = processor.patch_size, processor.pooling_kernel_size
        resized_height, resized_width = get_aspect_ratio_preserving_size(
            height=height, width=width, patch_size=patch, max_patches=max_soft_tokens * kernel**2,
            pooling_kernel_size=kernel)
        return (resized_height // patch) * (resized_width // patch) // kernel**2

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.image_processor.max_soft_tokens}


def _soft_token_budget(kwargs: Mapping[str, object], where: str) -> int | None:
    """`max_soft_tokens` from processor kwargs, checked; None when absent. Any other key is
    refused: the image processor takes no other setting here."""
    unknown = sorted(set(kwargs) - {"max_soft_tokens"})
    if unknown:
        raise ValueError(f"{where} {unknown} not supported for DiffusionGemma's images: the only setting is "
                         f"max_soft_tokens (one of {SOFT_TOKEN_CHOICES})")
    value = kwargs.get("max_soft_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or value not in SOFT_TOKEN_CHOICES:
        raise ValueError(f"max_soft_tokens must be one of {SOFT_TOKEN_CHOICES}, got {value!r}")
    return int(value)


class ImageDummyInputsBuilder(BaseDummyInputsBuilder[ImageProcessingInfo]):
    """vLLM's profiling input: images of exactly the largest soft-token count."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        processor = self.info.image_processor
        unit = processor.patch_size * processor.pooling_kernel_size
        tokens = processor.max_soft_tokens
        short = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)  # short * long == tokens
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=tokens // short * unit, height=short * unit,
                                                num_images=mm_counts.get("image", 0), overrides=overrides)}


class ImageProcessor(BaseMultiModalProcessor[ImageProcessingInfo]):
    def apply(self, inputs, timing_ctx):
        """vLLM's, refusing by name a prompt with fewer image tokens than images (vLLM's own
        check is a bare assertion); an expanded prompt holds more, and passes."""
        images = inputs.mm_data_items.get_count("image", strict=False)
        placeholders = inputs.prompt.count(self.info.get_hf_config().image_token_id)
        if placeholders < images:
            raise ValueError(f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} for {images} image(s): put one "
                             f"{IMAGE_PLACEHOLDER} where each image goes (chat messages place them themselves)")
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        images = hf_data.get("images", [])
        out = self.info.ctx.call_hf_processor(self.info.image_processor, {"images": images},
                                              {"max_soft_tokens": self.info.max_soft_tokens(hf_kwargs)})
        out["pixel_position_ids"] = out.pop("image_position_ids")
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image"),
                "pixel_position_ids": MultiModalFieldConfig.batched("image"),
                "num_soft_tokens_per_image": MultiModalFieldConfig.batched("image", keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:
        config = self.info.get_hf_config()
        budget = self.info.max_soft_tokens(hf_processor_mm_kwargs)
        images = mm_items.get_items("image", ImageProcessorItems) if "image" in mm_items else None

        def expanded(index: int) -> PromptUpdateDetails:
            size = images.get_image_size(index)
            soft = [config.image_token_id] * self.info.num_soft_tokens(size.width, size.height, budget)
            return PromptUpdateDetails.select_token_id([config.boi_token_id, *soft, config.eoi_token_id],
                                                       config.image_token_id)

        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=expanded)]
