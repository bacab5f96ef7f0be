"""Image input: prompts with images equal transformers' `generate` given the same draws.

The tiny checkpoint `IMAGE_SPEC` (testing/tiny_images.py) serves images; its window (16) is
narrower than an image (about 60 soft tokens), so the sliding layers' rule `(causal AND window)
OR same image` differs from both the causal and the window-free one. The reference is
transformers' `DiffusionGemmaForBlockDiffusion` with the pixel values of transformers' PIL
image processor and the prompt expanded as Gemma 4's processor expands it.
"""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pytest
import requests
import torch

from diffusiongemma_vllm.engine.scheduler import whole_images
from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.model.image_attention import image_span_attention
from diffusiongemma_vllm.testing.reference import reference_generate
from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint
from diffusiongemma_vllm.testing.tiny_images import (IMAGE, IMAGE_REQUESTS, IMAGE_SPEC as SPEC, pixels, random_image,
                                                      reference_image_generate)

BLOCKS = 2
STEPS = {"max_denoising_steps": 4}


def test_image_rows_attend_as_transformers_masks_them():
    """The soft-token queries' attention equals transformers' mask (`(causal AND window) OR
    same image` on sliding layers, `causal OR same image` on full ones) over the whole
    sequence, for an image wider than the window and a prefix longer than it."""
    from transformers.masking_utils import blockwise_overlay, causal_mask_function, or_masks, \
        sliding_window_causal_mask_function

    generator = torch.Generator().manual_seed(0)
    length, image_start, image_end, heads, kv_heads, dim = 60, 25, 45, 4, 2, 8
    q, k, v = (torch.randn(length, h, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    groups = torch.full((1, length), -1)
    groups[0, image_start:image_end] = 0
    for window in (None, 7):
        rule = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
        mask_fn = or_masks(rule, blockwise_overlay(groups))
        index = torch.arange(length)
        mask = torch.tensor([[bool(mask_fn(0, 0, i, j)) for j in index] for i in index])
        scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, dim=1))
        expected = torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(~mask, float("-inf")), -1),
                                v.repeat_interleave(2, dim=1))[image_start:image_end]
        key_start = 0 if window is None else image_start - (window - 1)
        keys = torch.arange(key_start, image_end)
        got = image_span_attention(q[image_start:image_end], torch.arange(image_start, image_end), k[keys], v[keys],
                                   keys, image_start, window)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _request_with_image(offset: int, soft_tokens: int):
    from vllm.multimodal.inputs import PlaceholderRange

    is_embed = torch.tensor([False] + [True] * soft_tokens + [False])
    return SimpleNamespace(mm_features=[SimpleNamespace(mm_position=PlaceholderRange(offset, soft_tokens + 2,
                                                                                       is_embed))])


@pytest.mark.parametrize("computed, new, expected", [
    (0, 20, 11),  # from before the image to inside its soft tokens: cut before them (boi included)
    (10, 20, 1),  # from its boi to inside: the boi only
    (15, 20, 0),  # from inside (a prefix-cache hit) to inside: wait for a budget that finishes it
    (0, 72, 72),  # through the last soft token: whole
    (0, 11, 11),  # ends before the soft tokens
    (15, 56, 56),  # from inside to the end
])
def test_chunks_never_end_inside_an_image(computed, new, expected):
    request = _request_with_image(offset=10, soft_tokens=60)  # boi 10, soft tokens 11..70, eoi 71
    assert whole_images(request, computed, new) == expected


@pytest.mark.parametrize("longest, expected, asked", [
    (96, 32, [42]),  # inside the image: looked up again, capped at its first soft token
    (128, 128, []),  # holds the whole image: kept
    (32, 32, []),  # ends before it: kept
])
def test_prefix_cache_hits_never_end_inside_an_image(longest, expected, asked):
    from diffusiongemma_vllm.engine.scheduler import cache_hits_outside_images

    calls = []

    def find_longest(block_hashes, cap):
        calls.append(cap)
        return ("blocks up to", cap // 32 * 32), cap // 32 * 32, 0

    manager = SimpleNamespace(get_computed_blocks=lambda request: ("blocks", longest, 0),
                              coordinator=SimpleNamespace(find_longest_cache_hit=find_longest),
                              create_kv_cache_blocks=lambda blocks: blocks)
    request = _request_with_image(offset=41, soft_tokens=60)  # soft tokens 42..101
    request.block_hashes = []
    _, hit, _ = cache_hits_outside_images(manager)(request)
    assert (hit, calls) == (expected, asked)


def test_text_only_when_the_image_tokens_lie_outside_the_vocabulary(tmp_path):
    """The release's image ids in a tiny vocabulary: text only (no bidirectional image ranges,
    no tower); the tiny tokenizer's ids (the CLI's `--images`): images served."""
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    from diffusiongemma_vllm.testing.tiny_checkpoint import main

    load_general_plugins()
    text_only = ModelConfig(model=str(build_tiny_checkpoint(tmp_path / "text", TinySpec())))
    main([str(tmp_path / "images"), "--images"])
    with_images = ModelConfig(model=str(tmp_path / "images"))
    assert text_only.multimodal_config.get_limit_per_prompt("image") == 0 and not text_only.is_mm_prefix_lm
    assert with_images.multimodal_config.get_limit_per_prompt("image") > 0 and with_images.is_mm_prefix_lm


def test_prompts_expand_as_transformers_processes_the_images(tmp_path):
    """The plugin's processor (vLLM's multimodal processing) against transformers' PIL image
    processor: each image token becomes boi, as many soft tokens as transformers counts for
    that image (odd sizes, a thin strip, a grayscale image), eoi; only soft tokens take
    embeddings; the pixels are transformers'. A request's `max_soft_tokens` may lower the
    budget, not raise it; other processor settings are refused, a server's at start-up (vLLM
    sizes its encoder budget then); fewer image tokens than images, and video, are refused."""
    from transformers import AutoTokenizer
    from vllm.config import ModelConfig
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.multimodal.processing.processor import TimingContext
    from vllm.plugins import load_general_plugins

    from diffusiongemma_vllm.testing.tiny_images import BOI, EOI, expanded

    load_general_plugins()
    model = str(build_tiny_checkpoint(tmp_path, SPEC))
    processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=model, dtype="float32"),
                                                     tokenizer=AutoTokenizer.from_pretrained(model))
    images = [random_image(4, 37, 23), random_image(5, 3, 200), random_image(6, 64, 64).convert("L")]
    prompt = [2, 300, IMAGE, 301, IMAGE, IMAGE, 302]

    def apply(kwargs=None):
        items = processor.info.parse_mm_data({"image": images})
        return processor.apply(ProcessorInputs(prompt, items, hf_processor_mm_kwargs=kwargs or {}),
                               TimingContext(enabled=False))

    out, want = apply(), pixels(images)
    assert out["prompt_token_ids"] == expanded(prompt, want)
    soft = [r.get_num_embeds() for r in out["mm_placeholders"]["image"]]
    assert soft == want["num_soft_tokens_per_image"].tolist() and len(set(soft)) == 3
    for placeholder in out["mm_placeholders"]["image"]:
        ids = out["prompt_token_ids"][placeholder.offset:placeholder.offset + placeholder.length]
        assert ids[0] == BOI and ids[-1] == EOI and set(ids[1:-1]) == {IMAGE}
    for item, pixel_values in zip(out["mm_kwargs"]["image"], want["pixel_values"]):
        assert torch.equal(item["pixel_values"].data, pixel_values)
    prompt = [2, 300, IMAGE, 301]  # three images, one image token
    with pytest.raises(ValueError, match=r"the prompt has 1 <\|image\|> for 3 image\(s\)"):
        apply()
    prompt = [2, 300, IMAGE, 301, IMAGE, IMAGE, 302]
    lower = apply({"max_soft_tokens": 70})
    assert lower["prompt_token_ids"] == out["prompt_token_ids"]
    with pytest.raises(ValueError, match="max_soft_tokens=140 is above the server's 70"):
        apply({"max_soft_tokens": 140})
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        apply({"max_soft_tokens": 100})
    with pytest.raises(ValueError, match=r"mm_processor_kwargs \['do_resize'\] not supported"):
        apply({"do_resize": False})
    configured = ModelConfig(model=model, dtype="float32", mm_processor_kwargs={"foo": 1})
    with pytest.raises(ValueError, match=r"--mm-processor-kwargs \['foo'\] not supported"):  # at start-up
        MULTIMODAL_REGISTRY.create_processor(configured, tokenizer=AutoTokenizer.from_pretrained(model)) \
            .info.get_mm_max_tokens_per_item(512, {"image": 1})
    with pytest.raises(VLLMValidationError, match="At most 0 video"):
        processor.info.parse_mm_data({"video": [[random_image(7, 8, 8)]]})


def test_a_broken_vision_tower_is_named(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from vllm.config import VllmConfig, set_current_vllm_config

    from diffusiongemma_vllm.model.config import CheckpointError
    from diffusiongemma_vllm.model.vision import ImageEncoder

    with set_current_vllm_config(VllmConfig()):  # vLLM's norm layers read it
        encoder = ImageEncoder(AutoConfig.from_pretrained(build_tiny_checkpoint(tmp_path, SPEC)), torch.float32)

    tensors = {n: t for n, t in load_file(tmp_path / "model.safetensors").items() if ".encoder.embed_vision" in n
               or ".encoder.vision_tower" in n}
    encoder.load_checkpoint_tensors(tensors, whole=True)
    name = "model.encoder.embed_vision.embedding_projection.weight"
    with pytest.raises(CheckpointError, match="missing 1 vision tensor.*embedding_projection"):
        encoder.load_checkpoint_tensors({n: t for n, t in tensors.items() if n != name}, whole=True)
    with pytest.raises(CheckpointError, match="embedding_projection.weight.*shape"):
        encoder.load_checkpoint_tensors({name: tensors[name][:, :-1]}, whole=False)
    with pytest.raises(CheckpointError, match="unexpected vision tensor"):
        encoder.load_checkpoint_tensors({"model.encoder.vision_tower.extra": tensors[name]}, whole=False)


# ---- through vLLM ----

REQUESTS = IMAGE_REQUESTS


def assert_reference_reply(reply, tokens: list[int], logprobs: torch.Tensor, tolerance: float) -> None:
    """The engine's reply commits the reference's tokens, each returned logprob within
    `tolerance` of the reference's ([tokens, V], reference_image_generate)."""
    assert list(reply.token_ids) == tokens
    for position, entry in enumerate(reply.logprobs):
        for token, logprob in entry.items():
            assert abs(logprob.logprob - logprobs[position, token].item()) < tolerance


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("images"), SPEC, seed=5))


@pytest.fixture(scope="module")
def references(image_dir):
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(image_dir, dtype=torch.float32).eval()
    sampler = SamplerConfig().with_request_overrides(STEPS)
    return [reference_image_generate(model, prompt, images, seed, BLOCKS, sampler) for prompt, images, seed in REQUESTS]


@pytest.mark.engine
@pytest.mark.parametrize("tensor_parallel, passes, batched_tokens", [(1, None, 96), (2, 2, 512)])
def test_engine_with_images_commits_the_reference_tokens(image_dir, references, bind_cpu_ranks, tensor_parallel,
                                                         passes, batched_tokens):
    """Catches image embeddings that are wrong or misplaced (scaled like text, another
    image's), causal attention inside an image, a window applied inside it, a prefill chunk
    that splits an image (96 tokens end inside the first request's image), a prefix-cache hit
    (the first request again) ending inside an image, whose sliding layers would read the null
    block for the image's start (their logprobs are off by 1e-2), and on two tensor-parallel
    ranks under `passes_per_step` a vision path that differs between ranks."""
    from vllm import LLM, SamplingParams

    if tensor_parallel > 1:
        bind_cpu_ranks(tensor_parallel)
    llm = LLM(model=image_dir, dtype="float32", max_model_len=512, enforce_eager=True, block_size=32,
              tensor_parallel_size=tensor_parallel, max_num_batched_tokens=batched_tokens,
              additional_config={"passes_per_step": passes} if passes else {})
    canvas = SPEC.canvas_length
    requests_ = [*REQUESTS, REQUESTS[0]]  # the last one hits the first one's cached prefix, image included
    references_ = [*references, references[0]]
    prompts = [{"prompt_token_ids": prompt, **({"multi_modal_data": {"image": images}} if images else {})}
               for prompt, images, _ in requests_]
    params = [SamplingParams(max_tokens=BLOCKS * canvas, seed=seed, ignore_eos=True, logprobs=1, extra_args=STEPS)
              for _, _, seed in requests_]
    outputs = llm.generate(prompts[:3], params[:3]) + llm.generate(prompts[3:], params[3:])
    for output, (ids, tokens, logprobs) in zip(outputs, references_):
        assert list(output.prompt_token_ids) == ids
        assert_reference_reply(output.outputs[0], tokens, logprobs, 1e-4)
    # The repeat's hit would end inside its image (at 96, soft tokens 42..101): it ends before.
    assert outputs[3].num_cached_tokens <= 42


@pytest.mark.engine
def test_lora_adapters_serve_image_prompts(image_dir, tmp_path):
    """Catches vLLM's LoRA manager wrapping the vision tower's `q_proj`... (the engine did not
    start with LoRA on), and an adapter missing from an image prompt's passes: an image request
    with an adapter and one without, against transformers with the adapter merged."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from diffusiongemma_vllm.testing.tiny_lora import build_tiny_adapter, reference_model

    adapter = str(build_tiny_adapter(image_dir, tmp_path / "adapter", seed=1))
    sampler = SamplerConfig().with_request_overrides(STEPS)
    prompt, images, seed = REQUESTS[0]
    expected = [reference_image_generate(reference_model(image_dir, path, tmp_path / "merged"), prompt, images, seed,
                                         BLOCKS, sampler) for path in (None, adapter)]
    assert expected[0][1] != expected[1][1]  # the adapter changes the reply
    llm = LLM(model=image_dir, dtype="float32", max_model_len=512, enforce_eager=True, enable_lora=True, max_loras=2,
              max_lora_rank=8)
    request = {"prompt_token_ids": prompt, "multi_modal_data": {"image": images}}
    params = SamplingParams(max_tokens=BLOCKS * SPEC.canvas_length, seed=seed, ignore_eos=True, logprobs=1,
                            extra_args=STEPS)
    outputs = llm.generate([request, request], [params, params],
                           lora_request=[None, LoRARequest("adapter", 1, adapter)])
    for output, (_, tokens, logprobs), tolerance in zip(outputs, expected, (1e-4, 3e-3)):
        assert_reference_reply(output.outputs[0], tokens, logprobs, tolerance)


def reload_vision(worker, path: str) -> int:
    """In the worker: vLLM's in-place reload of the vision tower's tensors of `path`."""
    from safetensors.torch import load_file

    from diffusiongemma_vllm.model.vision import is_vision_tensor

    tensors = [(n, t) for n, t in load_file(f"{path}/model.safetensors").items() if is_vision_tensor(n)]
    worker.model_runner.reload_weights(weights_iterator=tensors)
    return len(tensors)


@pytest.mark.engine
def test_an_update_of_the_vision_tower_reaches_image_prompts(image_dir, tmp_path, monkeypatch):
    """Catches a weight update that leaves the tower as it was (vLLM's in-place reload puts
    placeholders in the parameters and keeps the old values unless the loader goes through
    their weight loaders; it only logged that): another checkpoint's vision tensors, sent
    alone, and an image seen before the update then commit transformers' tokens for the text
    stack of the served checkpoint with that tower."""
    from safetensors.torch import load_file
    from transformers import DiffusionGemmaForBlockDiffusion
    from vllm import LLM, SamplingParams

    from diffusiongemma_vllm.model.vision import is_vision_tensor

    other = str(build_tiny_checkpoint(tmp_path / "other", SPEC, seed=6))
    prompt, images, seed = REQUESTS[0]
    sampler = SamplerConfig().with_request_overrides(STEPS)
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(image_dir, dtype=torch.float32).eval()
    before = reference_image_generate(reference, prompt, images, seed, BLOCKS, sampler)
    tower = {n: t for n, t in load_file(f"{other}/model.safetensors").items() if is_vision_tensor(n)}
    assert not reference.load_state_dict(tower, strict=False).unexpected_keys
    after = reference_image_generate(reference, prompt, images, seed, BLOCKS, sampler)
    assert before[1] != after[1]  # the tower changes the reply

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    llm = LLM(model=image_dir, dtype="float32", max_model_len=512, enforce_eager=True)
    request = {"prompt_token_ids": prompt, "multi_modal_data": {"image": images}}
    params = SamplingParams(max_tokens=BLOCKS * SPEC.canvas_length, seed=seed, ignore_eos=True, logprobs=1,
                            extra_args=STEPS)
    for expected, update in ((before, False), (after, True)):
        if update:
            assert llm.collective_rpc(reload_vision, args=(other,))[0] == len(tower)
            llm.reset_prefix_cache()  # K/V of the old tower's embeddings
            llm.llm_engine.reset_encoder_cache()  # the engine's record of the image's old embeddings
        _, tokens, logprobs = expected
        assert_reference_reply(llm.generate([request], [params])[0].outputs[0], tokens, logprobs, 1e-4)


@pytest.mark.engine
def test_images_through_the_openai_server(image_dir, references, tmp_path):
    """A chat message with an image (a data URL) commits the reference tokens of the prompt the
    server built; video is refused with a 400, and the server keeps serving."""
    from benchmarks.openai_server import OpenAIServer
    from transformers import DiffusionGemmaForBlockDiffusion

    picture = random_image(3, 28, 20)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    server = OpenAIServer(image_dir, "--max-model-len", "512", "--served-model-name", "tiny", "--dtype", "float32")
    try:
        message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What is this"}]}
        reply = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
            "model": "tiny", "messages": [message], "max_tokens": BLOCKS * SPEC.canvas_length, "seed": 21,
            "ignore_eos": True, "return_token_ids": True, "vllm_xargs": STEPS}).json()
        prompt_ids = reply["prompt_token_ids"]
        features = pixels([picture])
        assert prompt_ids.count(IMAGE) == int(features["num_soft_tokens_per_image"][0])
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(image_dir, dtype=torch.float32).eval()
        reference = reference_generate(model, prompt_ids, 21, BLOCKS, SamplerConfig().with_request_overrides(STEPS),
                                       images=features)
        assert reply["choices"][0]["token_ids"] == reference.sequences[0, len(prompt_ids):].tolist()

        video = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}
        refused = requests.post(server.url + "/v1/chat/completions", timeout=300,
                                json={"model": "tiny", "messages": [video], "max_tokens": 8})
        assert refused.status_code == 400 and "video" in refused.text
        again = requests.post(server.url + "/v1/completions", timeout=300,
                              json={"model": "tiny", "prompt": "Write", "max_tokens": 8})
        assert again.status_code == 200
    finally:
        server.stop()
