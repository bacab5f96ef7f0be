"""The model's shape, read once from the checkpoint's HF config and checked.

`BackboneConfig.from_hf(hf_config)` is the only place that interprets `config.json`: it
accepts both forms of the per-layer attention shapes (the release's `global_head_dim` /
`num_global_key_value_heads`, and the `per_layer_config` transformers writes when it saves)
and raises `CheckpointError` naming the field when something required is missing or wrong.
Everything downstream takes this frozen object, never the raw HF config.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

EXPECTED_MODEL_TYPE = "diffusion_gemma"
SLIDING = "sliding_attention"
FULL = "full_attention"


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: the message names the field or tensor."""


@dataclass(frozen=True)
class LayerAttention:
    """Attention shape of one layer; full layers take V from the K projection."""

    is_sliding: bool
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    partial_rotary_factor: float
    rope_type: str

    @property
    def k_eq_v(self) -> bool:
        return not self.is_sliding


@dataclass(frozen=True)
class BackboneConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    layers: tuple[LayerAttention, ...]
    sliding_window: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    rms_norm_eps: float
    final_logit_softcap: float
    max_position_embeddings: int
    canvas_length: int
    self_conditioning_size: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_hf(cls, hf_config) -> "BackboneConfig":
        model_type = getattr(hf_config, "model_type", None)
        if model_type != EXPECTED_MODEL_TYPE:
            raise CheckpointError(
                f"config.json field 'model_type' is {model_type!r}; this plugin serves {EXPECTED_MODEL_TYPE!r}"
            )
        text = _require(hf_config, "text_config", "config.json")
        layer_types = list(_require(text, "layer_types", "text_config"))
        for i, kind in enumerate(layer_types):
            if kind not in (SLIDING, FULL):
                raise CheckpointError(f"text_config field 'layer_types[{i}]' is {kind!r}")
        rope = _require(text, "rope_parameters", "text_config")
        layers = tuple(_layer_attention(text, i, kind, rope) for i, kind in enumerate(layer_types))
        eos = getattr(hf_config, "eos_token_id", None) or getattr(text, "eos_token_id", None)
        return cls(
            vocab_size=_positive_int(text, "vocab_size", "text_config"),
            hidden_size=_positive_int(text, "hidden_size", "text_config"),
            intermediate_size=_positive_int(text, "intermediate_size", "text_config"),
            num_heads=_positive_int(text, "num_attention_heads", "text_config"),
            layers=layers,
            sliding_window=_positive_int(text, "sliding_window", "text_config"),
            num_experts=_positive_int(text, "num_experts", "text_config"),
            top_k_experts=_positive_int(text, "top_k_experts", "text_config"),
            moe_intermediate_size=_positive_int(text, "moe_intermediate_size", "text_config"),
            rms_norm_eps=_require(text, "rms_norm_eps", "text_config"),
            final_logit_softcap=_require(text, "final_logit_softcapping", "text_config"),
            max_position_embeddings=_positive_int(text, "max_position_embeddings", "text_config"),
            canvas_length=_positive_int(hf_config, "canvas_length", "config.json"),
            self_conditioning_size=getattr(hf_config, "self_conditioning_size", None)
            or _positive_int(text, "intermediate_size", "text_config"),
            pad_token_id=_require(text, "pad_token_id", "text_config"),
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        )


def _positive_int(obj, name: str, where: str) -> int:
    value = _require(obj, name, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where} field {name!r} must be a positive integer, got {value!r}")
    return value


def _require(obj, name: str, where: str):
    value = getattr(obj, name, None)
    if value is None:
        raise CheckpointError(f"{where} is missing the required field {name!r}")
    return value


def _layer_attention(text, index: int, kind: str, rope: dict) -> LayerAttention:
    """Per-layer head dim and KV heads, from `per_layer_config` (transformers) or the
    release's `head_dim`/`global_head_dim` and KV-head fields."""
    per_layer = getattr(text, "per_layer_config", None)
    if per_layer is not None:
        entry = per_layer[index]
        head_dim, kv_heads = entry.head_dim, entry.num_key_value_heads
    else:
        if kind == FULL:
            head_dim = _require(text, "global_head_dim", "text_config")
            kv_heads = _require(text, "num_global_key_value_heads", "text_config")
        else:
            head_dim = _require(text, "head_dim", "text_config")
            kv_heads = _require(text, "num_key_value_heads", "text_config")
    if kind not in rope:
        raise CheckpointError(f"text_config field 'rope_parameters' has no entry for {kind!r}")
    params = rope[kind]
    return LayerAttention(
        is_sliding=kind == SLIDING,
        head_dim=head_dim,
        num_kv_heads=kv_heads,
        rope_theta=params["rope_theta"],
        partial_rotary_factor=params.get("partial_rotary_factor", 1.0),
        rope_type=params.get("rope_type", "default"),
    )


# Per-request knobs (SamplingParams.extra_args / vllm_xargs) carry the names of the
# checkpoint's generation_config.json, so one vocabulary describes both.
SAMPLER_FIELDS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max",
                  "stability_threshold", "confidence_threshold")
MAX_DENOISING_STEPS_LIMIT = 1024
# Temperatures the fp32 sampler computes with: the softcapped logits (|z| <= 30) divided by
# a temperature below this overflow the entropy's sums, and an infinite one flattens the
# canvas to padding (a red-team run found both served as blank text).
TEMPERATURE_RANGE = (1e-4, 1e4)


@dataclass(frozen=True)
class SamplerConfig:
    """The entropy-bound sampler's settings for one request (research/hf_reference.md s.3);
    the defaults are the release's generation_config.json values."""

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def __post_init__(self):
        _check_int(self, "max_denoising_steps", 1, MAX_DENOISING_STEPS_LIMIT)
        _check_int(self, "stability_threshold", 0, MAX_DENOISING_STEPS_LIMIT)
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("entropy_bound", "t_min"):  # transformers rejects 0 for both
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        low, high = TEMPERATURE_RANGE
        for name in ("t_min", "t_max"):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be within [{low:g}, {high:g}] (a sampling temperature), "
                                 f"got {getattr(self, name)!r}")
        if self.t_max < self.t_min:
            raise ValueError(f"t_max must be >= t_min, got t_max={self.t_max!r} < t_min={self.t_min!r}")

    @classmethod
    def from_generation_config(cls, generation: dict) -> "SamplerConfig":
        """Server defaults from generation_config.json (missing keys keep the release values)."""
        values = {name: generation[name] for name in SAMPLER_FIELDS if name in generation and name != "entropy_bound"}
        sampler = generation.get("sampler_config") or {}
        if not isinstance(sampler, dict):
            raise CheckpointError(f"generation_config.json: sampler_config must be an object, got {sampler!r}")
        if "entropy_bound" in sampler:
            values["entropy_bound"] = sampler["entropy_bound"]
        try:
            return cls(**values)
        except ValueError as error:
            raise CheckpointError(f"generation_config.json: {error}") from None

    @classmethod
    def served_by(cls, model_config) -> "SamplerConfig":
        """The defaults an engine applies: its checkpoint's generation_config.json. Admission
        (engine/config_hook.py) and the worker step both take them from here, so they agree."""
        return cls.from_generation_config(model_config.try_get_generation_config() or {})

    def to_generation_config(self) -> dict:
        """The generation_config.json fields (inverse of `from_generation_config`)."""
        fields = {name: getattr(self, name) for name in SAMPLER_FIELDS if name != "entropy_bound"}
        return {**fields, "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig",
                                             "entropy_bound": self.entropy_bound}}

    def with_request_overrides(self, extra_args: dict | None) -> "SamplerConfig":
        """Apply a request's knobs; raises ValueError naming the field for a bad value."""
        overrides = {k: v for k, v in (extra_args or {}).items() if k in SAMPLER_FIELDS}
        if not overrides:
            return self
        try:
            return type(self)(**{**self.__dict__, **overrides})
        except ValueError as error:  # say which side of a cross-field rule the request did not set
            inherited = [name for name in SAMPLER_FIELDS if name not in overrides and name in str(error)]
            if not inherited:
                raise
            raise ValueError(f"{error} ({', '.join(inherited)} is the served model's default, from its "
                             f"generation_config.json)") from None

    def temperature(self, step: int) -> float:
        """Temperature of pass `step` (0-based): t_max at the first pass, falling linearly so
        that the last allowed pass runs at t_min + (t_max - t_min) / N, as transformers'
        schedule does with `cur_step` counting the passes that remain."""
        remaining = self.max_denoising_steps - step
        return self.t_min + (self.t_max - self.t_min) * remaining / self.max_denoising_steps


def _check_int(obj, name: str, low: int, high: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def passes_per_step(additional_config) -> int | None:
    """The engine's `additional_config["passes_per_step"]` (engine/worker_step.py): the most denoise
    passes one scheduler step runs, or None (absent) for whole canvases in every step."""
    settings = additional_config if isinstance(additional_config, dict) else {}
    for key in settings:  # other plugins' keys pass; a near miss of ours is a typo
        if key != "passes_per_step" and difflib.get_close_matches(key, ["passes_per_step"], cutoff=0.8):
            raise ValueError(f"additional_config has {key!r}: did you mean 'passes_per_step'?")
    value = settings.get("passes_per_step")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"additional_config passes_per_step must be an integer >= 1, got {value!r}")
    return value
