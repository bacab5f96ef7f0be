"""Weight updates after start-up: what keeps the engine serving when one fails.

vLLM updates a running model's weights in place (`reload_weights`: from a path, or from an
iterator of checkpoint tensors, as RL trainers send them) through its layer-wise reload:
every layer is put on the meta device, the incoming tensors of a layer are buffered until
the layer has all of them, then it is materialised, loaded, processed (quantized, packed)
and copied back into its original storage, so CUDA graphs keep their pointers. The model's
`load_weights` checks each tensor (model/checkpoint.py) and raises on an unknown name, a
wrong shape or dtype; vLLM then leaves the remaining layers on the meta device, and the next
step stops the engine.

`restore_unfinished_layers` ends such a failed update cleanly: the layers whose tensors had
all arrived keep the new weights, every other layer (untouched, or with some tensors
buffered) gets its previous weights back, and the error still reaches the caller. The model
is then a mix of old and new layers until an update succeeds. `restored_on_failure` wraps a
step of an update (the runner's reload, a session's chunk) in that.

Under tensor parallelism every rank runs the step, and vLLM's multiprocess executor reads the
ranks' replies in rank order, raising at the first failure without reading the others': those
then answer the engine's next call to all ranks (a good update after a failed one is reported
failed with the old error, `diffusion_stats` returns a stale reply). `reported_by_last_rank`
wraps a step so that when any rank fails, only the last rank raises and the others log their
error and reply normally: every reply is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from vllm.distributed import get_tp_group
from vllm.logger import init_logger
from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload, get_layerwise_info

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures


@contextmanager
def reported_by_last_rank() -> Iterator[None]:
    """Inside: a step of an update that every tensor-parallel rank runs. If it fails on any
    rank, the last rank raises (its own error, else the first failing rank's, named) and the
    others log theirs and return, so that vLLM's executor reads every rank's reply."""
    group = get_tp_group()
    if group.world_size == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as raised:  # noqa: BLE001 - every error is reported, by one rank
        error = raised
    failures = [None] * group.world_size
    torch.distributed.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}",
                                        group=group.cpu_group)
    failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if not failed:
        return
    if group.rank_in_group < group.world_size - 1:
        if error is not None:
            logger.error("DiffusionGemma: this rank's part of the update failed (the last rank reports it): %s",
                         failures[group.rank_in_group])
        return
    if error is not None:
        raise error
    raise RuntimeError(f"the update failed on tensor-parallel rank {failed[0][0]}: {failed[0][1]}")


@contextmanager
def restored_on_failure(model: torch.nn.Module, model_config) -> Iterator[None]:
    """Inside: a step of an in-place update. If it raises, the model's update ends and its
    unfinished layers get their previous tensors back before the error goes on."""
    try:
        yield
    except Exception:
        model.drop_update()
        restore_unfinished_layers(model, model_config)
        raise


def restore_unfinished_layers(model: torch.nn.Module, model_config) -> None:
    """After a failed in-place reload: drop what each unfinished layer buffered, so vLLM's
    finalisation puts its previous tensors back instead of processing a half-loaded layer."""
    for layer in model.modules():
        info = get_layerwise_info(layer)
        if info.can_load() and info.load_numel < info.load_numel_total:
            info.load_numel = 0
            info.loaded_weights.clear()
    finalize_layerwise_reload(model, model_config)
