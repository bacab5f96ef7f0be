"""The plugin model outside the engine: vLLM's loader, our canvas attention, a paged KV store.

Parity tests and the reference generator need to drive the model pass by pass (prefill a
prompt, denoise a canvas with chosen inputs, commit it) without a scheduler. This module
loads `DiffusionGemmaForBlockDiffusion` through vLLM's own model loader in this process
(single rank, gloo) and keeps each attention layer's K/V in a plain position-indexed store.
Every pass, the prompt prefill included, runs through the canvas attention op: prefill and
commit as causal passes whose K/V the store keeps, denoise as a bidirectional read-only pass.

vLLM's paged-attention prefill path is exercised by the engine tests instead.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch

from diffusiongemma_vllm.model.canvas_context import CanvasPass, PrefixKV, canvas_forward_context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_standalone(model_dir: str, dtype: str = "float32", max_model_len: int = 4096):
    """Build a VllmConfig for `model_dir` and load the plugin model with vLLM's loader."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model

    from diffusiongemma_vllm import register

    register()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = EngineArgs(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
                      limit_mm_per_prompt={"image": 0, "video": 0})
    vllm_config = args.create_engine_config()
    if vllm_config.device_config.device.type == "cpu":
        # vLLM's CPU runner makes the torch.accelerator calls its loader makes into no-ops.
        from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

        _set_torch_accelerator_to_noop()
    with set_current_vllm_config(vllm_config):
        if not model_parallel_is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
            initialize_model_parallel(1, 1)
        model = get_model(vllm_config=vllm_config)
    return StandaloneModel(model.eval(), vllm_config)


@dataclass
class KVStore:
    """Per-layer K/V of every request, position-indexed: `[requests, max_len, kv_heads, head_dim]`."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def prefix(self, rows: torch.Tensor, context_lens: torch.Tensor):
        width = int(context_lens.max())

        def lookup(layer_name: str) -> PrefixKV:
            key, value = self.tensors[layer_name]
            return PrefixKV(key[rows, :width], value[rows, :width], context_lens)

        return lookup

    def sink(self, rows: torch.Tensor, context_lens: torch.Tensor):
        def store(layer_name: str, key: torch.Tensor, value: torch.Tensor) -> None:
            keys, values = self.tensors[layer_name]
            for i, (row, start) in enumerate(zip(rows.tolist(), context_lens.tolist())):
                keys[row, start:start + key.shape[1]] = key[i]
                values[row, start:start + key.shape[1]] = value[i]

        return store


@dataclass
class StandaloneModel:
    model: torch.nn.Module
    vllm_config: object
    kv: KVStore | None = field(default=None)

    @property
    def canvas_length(self) -> int:
        return self.model.cfg.canvas_length

    def allocate(self, num_requests: int, max_len: int) -> None:
        dtype = next(self.model.parameters()).dtype
        tensors = {}
        for layer in self.model.model.layers:
            attn = layer.self_attn
            shape = (num_requests, max_len, attn.num_kv_heads, attn.head_dim)
            # NaN-poisoned: reading a position nobody wrote shows up in every output.
            tensors[attn.attn.layer_name] = (torch.full(shape, float("nan"), dtype=dtype),
                                             torch.full(shape, float("nan"), dtype=dtype))
        self.kv = KVStore(tensors)

    def _run(self, embeds, positions, spec: CanvasPass) -> torch.Tensor:
        from vllm.config import set_current_vllm_config
        with torch.inference_mode(), set_current_vllm_config(self.vllm_config), \
                canvas_forward_context(spec, self.vllm_config, self.model.attention_layer_names()):
            return self.model(None, positions, inputs_embeds=embeds)

    def prefill(self, rows: torch.Tensor, ids: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """Causal pass over `ids` [n, T] at positions context_lens + [0, T); stores K/V; returns hidden."""
        n, length = ids.shape
        positions = (context_lens[:, None] + torch.arange(length)).flatten()
        with torch.inference_mode():
            embeds = self.model.embed_input_ids(ids.flatten())
        spec = CanvasPass(context_lens, length, self.kv.prefix(rows, context_lens), causal=True,
                          kv_sink=self.kv.sink(rows, context_lens))
        return self._run(embeds, positions, spec).view(n, length, -1)

    def denoise(self, rows: torch.Tensor, canvas: torch.Tensor, context_lens: torch.Tensor,
                soft_embeds: torch.Tensor | None) -> torch.Tensor:
        """Bidirectional read-only pass over `canvas` [n, C]; returns hidden [n, C, H]."""
        n, length = canvas.shape
        positions = (context_lens[:, None] + torch.arange(length)).flatten()
        with torch.inference_mode():
            flat_soft = None if soft_embeds is None else soft_embeds.flatten(0, 1)
            embeds = self.model.embed_canvas(canvas.flatten(), flat_soft)
        spec = CanvasPass(context_lens, length, self.kv.prefix(rows, context_lens))
        return self._run(embeds, positions, spec).view(n, length, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.compute_logits(hidden.flatten(0, -2)).view(*hidden.shape[:-1], -1)
