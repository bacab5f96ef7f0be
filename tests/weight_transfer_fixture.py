"""A weight-transfer engine for the tests (tests/test_weight_updates.py): vLLM's RL update
session (`init_weight_transfer_engine`, `start_weight_update`, `update_weights` chunk by
chunk, `finish_weight_update`) with each chunk read from a checkpoint file instead of sent
over NCCL, in checkpoint format through vLLM's layer-wise reload, as vLLM's NCCL engine does.

The worker imports this module through `worker_extension_cls`, which registers the engine
there as "test_file" before vLLM builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from safetensors.torch import load_file
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload, initialize_layerwise_reload

BOGUS = "model.decoder.layers.0.bogus.weight"


@dataclass
class FileInitInfo(WeightTransferInitInfo):
    pass


@dataclass
class FileUpdateInfo(WeightTransferUpdateInfo):
    path: str  # a checkpoint folder
    layer_zero: bool  # this chunk: the tensors inside layer 0, or all the others
    bogus: bool = False  # also a tensor no checkpoint has, second in the chunk
    only: list[str] | None = None  # of those, only these names


class FileWeightTransferEngine(WeightTransferEngine[FileInitInfo, FileUpdateInfo]):
    init_info_cls = FileInitInfo
    update_info_cls = FileUpdateInfo

    def init_transfer_engine(self, init_info: FileInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: FileUpdateInfo) -> None:
        tensors = [(n, t) for n, t in load_file(f"{update_info.path}/model.safetensors").items()
                   if ("layers.0." in n) == update_info.layer_zero
                   and (update_info.only is None or n in update_info.only)]
        if update_info.bogus:
            tensors.insert(1, (BOGUS, tensors[0][1]))
        self.model.load_weights(tensors)

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass


WeightTransferEngineFactory.register_engine("test_file", FileWeightTransferEngine)


class RegistersTheFileEngine:
    """The `worker_extension_cls`: importing it is what registers the engine in the worker."""
