"""The plugin model against transformers' DiffusionGemmaForBlockDiffusion, fp32 on CPU.

Each check runs the same inputs through both and bounds the relative error
max|ours - ref| / max|ref| of the fp32, soft-capped logits by 1e-4 (measured: about 1e-6).
Prompts are longer than the sliding window, so the window-1 prefix seen by sliding layers
is exercised; the 'sssf' backbone has several sliding layers per full layer.
"""

from __future__ import annotations

import pytest
import torch

from diffusiongemma_vllm.testing.standalone import load_standalone

TOLERANCE = 1e-4


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=["sf", "sssf"])
def pair(request, tiny_dirs):
    from transformers import DiffusionGemmaForBlockDiffusion

    path = tiny_dirs[request.param]
    ours = load_standalone(path)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    return ours, ref


def hf_encode(ref, ids, cache):
    """Prefill logits from transformers' encoder pass (it writes `cache`, a DynamicCache)."""
    enc = ref.model.encoder(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = ref.lm_head(enc.last_hidden_state).float()
    return torch.tanh(logits / 30.0) * 30.0


def hf_denoise(ref, canvas, cache, sc_logits=None):
    out = ref(past_key_values=cache, decoder_input_ids=canvas, self_conditioning_logits=sc_logits)
    return out.logits


def new_cache(ref):
    from transformers import DynamicCache

    return DynamicCache(config=ref.config.text_config)


def prefill_both(ours, ref, ids, max_len: int):
    """The prompt `ids` [1, L] prefilled in both models: our request row 0 (a cache of
    `max_len` tokens) and transformers' cache, which is returned."""
    ours.allocate(1, max_len)
    ours.prefill(torch.tensor([0]), ids, torch.tensor([0]))
    cache = new_cache(ref)
    hf_encode(ref, ids, cache)
    return cache


@torch.no_grad()
def test_prefill_logits_match(pair):
    """Catches any drift in the causal stack: norms, rope, k_eq_v, MoE routing, layer_scalar."""
    ours, ref = pair
    ids = torch.randint(0, ours.model.cfg.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    ours.allocate(1, 256)
    got = ours.logits(ours.prefill(torch.tensor([0]), ids, torch.tensor([0])))
    want = hf_encode(ref, ids, new_cache(ref))
    assert relative_error(got, want) < TOLERANCE


@torch.no_grad()
def test_denoise_logits_match_with_and_without_self_conditioning(pair):
    """Catches wrong canvas attention (window-1 prefix, bidirectional canvas), a missing
    self-conditioning post-norm on the first pass, and a wrong soft-embedding scale."""
    ours, ref = pair
    cfg = ours.model.cfg
    gen = torch.Generator().manual_seed(2)
    prompt_len = 2 * cfg.sliding_window + 3
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=gen)
    cache = prefill_both(ours, ref, ids, 512)
    rows = torch.tensor([0])

    first = ours.logits(ours.denoise(rows, canvas, torch.tensor([prompt_len]), None))
    want_first = hf_denoise(ref, canvas, cache)
    assert relative_error(first, want_first) < TOLERANCE

    # Self-conditioning: feed back temperature-scaled logits of the first pass.
    scaled = want_first / 0.7
    unembedding = ours.model.unembedding()
    soft = torch.softmax(scaled.float(), dim=-1) @ unembedding.weight * unembedding.scale
    second = ours.logits(ours.denoise(rows, canvas, torch.tensor([prompt_len]), soft))
    want_second = hf_denoise(ref, canvas, cache, sc_logits=scaled)
    assert relative_error(second, want_second) < TOLERANCE


@torch.no_grad()
def test_commit_then_next_block_and_batched_requests(pair):
    """Catches a commit written at the wrong positions/slots and cross-request leakage when
    canvases with different prefix lengths share one denoise pass."""
    ours, ref = pair
    cfg = ours.model.cfg
    gen = torch.Generator().manual_seed(3)
    lengths = [cfg.sliding_window + 5, 2 * cfg.sliding_window + 1]
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), generator=gen) for n in lengths]
    blocks = [torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=gen) for _ in lengths]
    canvases = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=gen)
    ours.allocate(2, 1024)
    wants = []
    for r, (prompt, block) in enumerate(zip(prompts, blocks)):
        row = torch.tensor([r])
        ours.prefill(row, prompt, torch.tensor([0]))
        ours.prefill(row, block, torch.tensor([prompt.shape[1]]))  # commit of block 1
        cache = new_cache(ref)
        hf_encode(ref, prompt, cache)
        ref.model.encoder(input_ids=block, past_key_values=cache, use_cache=True,
                          position_ids=torch.arange(prompt.shape[1], prompt.shape[1] + cfg.canvas_length)[None])
        wants.append(hf_denoise(ref, canvases[r:r + 1], cache))
    prefix = torch.tensor([n + cfg.canvas_length for n in lengths])
    got = ours.logits(ours.denoise(torch.tensor([0, 1]), canvases, prefix, None))
    assert relative_error(got, torch.cat(wants)) < TOLERANCE


@torch.no_grad()
def test_a_canvas_reaching_past_max_position_embeddings(tmp_path):
    """Catches a RoPE table of only max_position_embeddings rows: the canvas after the last
    committable position (max_model_len - 1, here max_position_embeddings - 1) reaches C - 1
    positions beyond it, which read past the table: silently wrong rotations on CPU (measured
    here before the fix), a device-side assert or garbage on a GPU. transformers computes any
    position."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    path = str(build_tiny_checkpoint(tmp_path, TinySpec(max_position_embeddings=48, canvas_length=16), seed=5))
    ours = load_standalone(path, max_model_len=48)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(4)
    prompt_len = 47
    ids = torch.randint(0, ours.model.cfg.vocab_size, (1, prompt_len), generator=gen)
    canvas = torch.randint(0, ours.model.cfg.vocab_size, (1, 16), generator=gen)
    cache = prefill_both(ours, ref, ids, 64)
    got = ours.logits(ours.denoise(torch.tensor([0]), canvas, torch.tensor([prompt_len]), None))
    assert relative_error(got, hf_denoise(ref, canvas, cache)) < TOLERANCE

