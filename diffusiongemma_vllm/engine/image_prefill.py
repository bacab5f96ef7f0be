"""Where a vLLM forward's image soft tokens are, and which cached K/V each image's queries read.

Built on the host from the runner's batch before each of vLLM's forwards that computes soft
tokens (model_runner.py), and read by every attention layer (model/image_attention.py).
The plugin's scheduler keeps an image's soft tokens inside one prefill chunk, and ends every
prefix-cache hit outside an image (scheduler.py), so all of an image's K/V are in the cache
when its queries read them.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusiongemma_vllm.engine.kv_layout import first_kept, token_slots
from diffusiongemma_vllm.model.image_attention import ImagePrefill, ImageSpan


def image_prefill(runner) -> ImagePrefill | None:
    """The images whose soft tokens this step's forward computes, or None when it computes none."""
    batch = runner.input_batch
    starts = runner.query_start_loc.cpu
    groups = runner.kv_cache_config.kv_cache_groups
    device = runner.device
    spans = []
    for row, req_id in enumerate(batch.req_ids):
        features = runner.requests[req_id].mm_features
        scheduled = int(starts[row + 1] - starts[row])
        if not features or not scheduled:
            continue
        first = int(batch.num_computed_tokens_cpu[row])
        end = first + scheduled
        for feature in features:
            for lo, hi in feature.mm_position.extract_embeds_range():  # inclusive
                image_start, image_end = lo, hi + 1
                queries = np.arange(max(image_start, first), min(image_end, end))
                if not queries.size:
                    continue
                if image_end > end:
                    raise RuntimeError(f"request {req_id}: the image at positions [{image_start}, {image_end}) "
                                       f"is split across prefill chunks (this step ends at {end})")
                slots, positions = {}, {}
                for group_id, group in enumerate(groups):
                    spec = group.kv_cache_spec
                    keys = np.arange(first_kept(image_start, getattr(spec, "sliding_window", None)), image_end)
                    table = batch.block_table[group_id].get_numpy_array()[row]
                    slots[group_id] = token_slots(table, keys, spec.block_size).to(device)
                    positions[group_id] = torch.from_numpy(keys).to(device)
                spans.append(ImageSpan(torch.from_numpy(queries - first + int(starts[row])).to(device),
                                       torch.from_numpy(queries).to(device), image_start, slots, positions))
    if not spans:
        return None
    group_of_layer = {name: group_id for group_id, group in enumerate(groups) for name in group.layer_names}
    return ImagePrefill(spans, group_of_layer)
