"""Broken checkpoints fail at load with an error that names the tensor or field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusiongemma_vllm.model.config import BackboneConfig, CheckpointError
from diffusiongemma_vllm.testing.standalone import load_standalone

WEIGHTS = "model.safetensors"


def broken_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / WEIGHTS)
        edit_tensors(tensors)
        save_file(tensors, dst / WEIGHTS)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    """Catches a checkpoint with a dropped tensor loading as zero/garbage parameters."""
    name = "model.decoder.layers.1.router.per_expert_scale"
    path = broken_copy(tiny_dir, tmp_path / "ckpt", edit_tensors=lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_standalone(path)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    """Catches a bare shape assertion deep in a weight loader instead of a named error."""
    name = "model.decoder.layers.0.self_attn.q_proj.weight"

    def widen(tensors):
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])

    path = broken_copy(tiny_dir, tmp_path / "ckpt", edit_tensors=widen)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*shape"):
        load_standalone(path)


def test_unexpected_tensor_is_named(tiny_dir, tmp_path):
    """Catches a checkpoint from another layout (e.g. a v_proj on a k_eq_v layer) loading silently."""
    name = "model.decoder.layers.1.self_attn.v_proj.weight"

    def add(tensors):
        tensors[name] = tensors["model.decoder.layers.1.self_attn.k_proj.weight"].clone()

    path = broken_copy(tiny_dir, tmp_path / "ckpt", edit_tensors=add)
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.v_proj"):
        load_standalone(path)


def test_wrong_model_type_is_named():
    """Catches serving a different model family through this plugin's class."""
    from transformers import LlamaConfig

    with pytest.raises(CheckpointError, match="model_type"):
        BackboneConfig.from_hf(LlamaConfig())


def test_missing_config_field_is_named(tiny_dir):
    """Catches a config.json without the MoE fields turning into an obscure error later."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    config.text_config.num_experts = None
    with pytest.raises(CheckpointError, match="num_experts"):
        BackboneConfig.from_hf(config)


@pytest.mark.parametrize("value", [-32, 0])
def test_bad_canvas_length_is_named(tiny_dir, value):
    """Catches a canvas length that starts the engine and kills it at the first request
    (a negative dimension), or fails start-up with a bare ZeroDivisionError."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    config.canvas_length = value
    with pytest.raises(CheckpointError, match="canvas_length.*positive integer"):
        BackboneConfig.from_hf(config)


def test_integer_weights_are_named(tiny_dir, tmp_path):
    """Catches an integer tensor where a float weight belongs loading silently (cast to floats,
    changing every output)."""
    name = "model.decoder.layers.0.self_attn.q_proj.weight"

    def to_int(tensors):
        tensors[name] = tensors[name].to(torch.int32)

    path = broken_copy(tiny_dir, tmp_path / "ckpt", edit_tensors=to_int)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*dtype int32"):
        load_standalone(path)


def test_sampler_config_that_is_not_an_object_is_named():
    """Catches generation_config.json's sampler_config given as a string being ignored (the
    checkpoint's entropy bound silently replaced by the release default)."""
    from diffusiongemma_vllm.model.config import SamplerConfig

    with pytest.raises(CheckpointError, match="sampler_config"):
        SamplerConfig.from_generation_config({"sampler_config": "x"})
