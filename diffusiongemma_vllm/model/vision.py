"""The image encoder: Gemma 4's vision tower and the projection of its output into the text
embedding space (`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`).

The tower is transformers' own Gemma 4 vision model, as vLLM's Gemma 4 builds it: patches in,
one feature per soft token out, the padding patches dropped. `embed_vision` is an RMSNorm
without a scale and a bias-free linear to the text width; its output replaces the soft
tokens' embeddings, unscaled (the text embeddings are scaled by sqrt(hidden)). Weights load
by name and shape from the checkpoint; a missing, unexpected or misshapen tensor is a
`CheckpointError` naming it. The tower is replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.model_executor.layers.layernorm import RMSNorm

from diffusiongemma_vllm.model.checkpoint import VISION_PREFIXES
from diffusiongemma_vllm.model.config import CheckpointError


def is_vision_tensor(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


class ImageProjection(nn.Module):
    """Vision features into the text embedding space (transformers' multimodal embedder)."""

    def __init__(self, vision_hidden: int, text_hidden: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(vision_hidden, eps=eps, has_weight=False)
        self.embedding_projection = nn.Linear(vision_hidden, text_hidden, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(features))


class ImageEncoder(nn.Module):
    def __init__(self, hf_config, dtype: torch.dtype):
        super().__init__()
        from transformers import AutoModel

        vision = hf_config.vision_config
        self.vision_tower = AutoModel.from_config(vision, dtype=dtype)
        self.embed_vision = ImageProjection(getattr(vision, "output_proj_dims", vision.hidden_size),
                                            hf_config.text_config.hidden_size, vision.rms_norm_eps).to(dtype)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor,
                soft_tokens: list[int]) -> list[torch.Tensor]:
        """pixel_values [images, patches, 3 * patch^2] and position_ids [images, patches, 2]
        (padding patches at -1) from the image processor: each image's soft-token embeddings,
        [soft_tokens[i], text hidden]."""
        features = []
        for pixels, positions in zip(pixel_values, position_ids):  # one at a time: each drops its own padding
            out = self.vision_tower(pixel_values=pixels[None].to(self.embed_vision.embedding_projection.weight.dtype),
                                    pixel_position_ids=positions[None]).last_hidden_state
            features.append(self.embed_vision(out))
        for i, (feature, expected) in enumerate(zip(features, soft_tokens)):
            if feature.shape[0] != expected:
                raise ValueError(f"image {i}: the vision tower gave {feature.shape[0]} soft tokens, "
                                 f"the prompt holds {expected}")
        return features

    def _targets(self) -> dict[str, torch.Tensor]:
        """The module's tensors by checkpoint name."""
        return {_CHECKPOINT_PREFIX + name: tensor for name, tensor in self.state_dict(keep_vars=True).items()}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], whole: bool) -> set[str]:
        """The checkpoint's tensors under `model.encoder.vision_tower.` and `.embed_vision.`:
        all of them (`whole`), or some (a weight update), each checked by name and shape, then
        loaded through vLLM's loader (its weight loaders, which an in-place reload records);
        returns the names (under this module) it loaded."""
        from vllm.model_executor.models.utils import AutoWeightsLoader

        targets = self._targets()
        for name, tensor in tensors.items():
            if name not in targets:
                raise CheckpointError(f"checkpoint has unexpected vision tensor {name!r} for this config")
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise CheckpointError(f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, "
                                      f"expected {list(targets[name].shape)}")
        missing = sorted(set(targets) - set(tensors)) if whole else []
        if missing:
            raise CheckpointError(f"checkpoint is missing {len(missing)} vision tensor(s): {', '.join(missing[:5])}")
        return AutoWeightsLoader(self).load_weights(
            (name.removeprefix(_CHECKPOINT_PREFIX), tensor) for name, tensor in tensors.items())


_CHECKPOINT_PREFIX = "model.encoder."  # + vision_tower.* / embed_vision.*: this module's own names
