"""The shape of a Llama-family checkpoint: read from ``config.json``, or named by a preset. No torch here.

A shape is what the supervisor needs to validate a run before anything is spawned (is it Llama-family, do the heads
split over tp, the layers over pp, does it fit in memory) and what the worker needs to build its slice of the model.
``config.json`` keys follow Hugging Face's ``LlamaConfig``; both spellings of the rotary settings are read (the
older ``rope_theta`` + ``rope_scaling``, and transformers 5's ``rope_parameters``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

LLAMA_MODEL_TYPES = ("llama",)  # config.json "model_type" values this decoder implements exactly
ROPE_TYPES = ("default", "llama3")  # rotary variants implemented; others (yarn, dynamic, ...) are refused
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ShapeError(ValueError):
    """A checkpoint or layout this decoder cannot run. ``key`` names the setting to blame (one-line errors)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True)
class RopeSettings:
    theta: float = 10000.0
    kind: str = "default"  # default | llama3
    factor: float = 1.0  # llama3: how much the low frequencies are stretched
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    rope: RopeSettings = field(default_factory=RopeSettings)
    bos_token_id: int = 1
    eos_token_id: int = 2

    # -- sizes ---------------------------------------------------------------------------------------------------
    def layer_params(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return attn + 3 * h * self.intermediate_size + 2 * h

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_hidden_layers * self.layer_params() + heads * self.embedding_params() + self.hidden_size

    def rank_bytes(self, tp: int, pp: int, dtype: str, batch: int, max_seq: int) -> int:
        """Upper bound of one rank's weights + KV cache: its 1/tp of its stage's layers, and the replicated
        embedding and output head (both counted: stage 0 holds one, the last stage the other)."""
        n = DTYPE_BYTES[dtype]
        layers = -(-self.num_hidden_layers // pp)
        weights = layers * self.layer_params() // tp + 2 * self.embedding_params()
        kv = 2 * layers * batch * (self.num_key_value_heads // tp) * self.head_dim * max_seq
        return (weights + kv) * n

    # -- config.json ----------------------------------------------------------------------------------------------
    def to_hf_config(self, dtype: str) -> dict[str, Any]:
        """The config.json of a checkpoint of this shape, as transformers writes it for a LlamaForCausalLM."""
        r = self.rope
        rope_scaling = None if r.kind == "default" else {
            "rope_type": r.kind, "factor": r.factor, "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": r.theta, "rope_scaling": rope_scaling, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "initializer_range": 0.02,
        }


# Presets: "tiny" for CPU tests (GQA, llama3 rope scaling that actually bends frequencies at this size, untied
# head); "llama-3.2-1b" and "llama-3.1-8b" are the shapes of the public Llama 3.x models (their config.json).
_LLAMA3_ROPE = dict(theta=500000.0, kind="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
PRESETS: dict[str, LlamaShape] = {
    "tiny": LlamaShape(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=1024,
                       rope=RopeSettings(theta=10000.0, kind="llama3", factor=4.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=64)),
    "llama-3.2-1b": LlamaShape(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                               max_position_embeddings=131072, tie_word_embeddings=True,
                               rope=RopeSettings(factor=32.0, **_LLAMA3_ROPE),
                               bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": LlamaShape(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=131072, tie_word_embeddings=False,
                               rope=RopeSettings(factor=8.0, **_LLAMA3_ROPE),
                               bos_token_id=128000, eos_token_id=128001),
}
PRESETS["1b"] = PRESETS["llama-3.2-1b"]
PRESETS["8b"] = PRESETS["llama-3.1-8b"]


def preset(name: str) -> LlamaShape:
    if name not in PRESETS:
        raise ShapeError("llm.preset", f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    return PRESETS[name]


def read_shape(checkpoint_dir: str) -> LlamaShape:
    """The shape of the checkpoint in ``checkpoint_dir``; ShapeError when it is missing or not Llama-family."""
    path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ShapeError("llm.checkpoint", f"cannot read {path}: {exc}") from None
    return shape_from_hf_config(cfg)


def shape_from_hf_config(cfg: dict[str, Any]) -> LlamaShape:
    model_type = cfg.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise ShapeError("llm.checkpoint", f"model_type {model_type!r} is not Llama-family "
                                           f"(this decoder runs: {', '.join(LLAMA_MODEL_TYPES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ShapeError("llm.checkpoint", f"{flag}=true is not supported by this decoder")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ShapeError("llm.checkpoint", f"hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return LlamaShape(
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope=_rope(cfg),
            bos_token_id=_first_id(cfg.get("bos_token_id"), 1), eos_token_id=_first_id(cfg.get("eos_token_id"), 2))
    except (KeyError, TypeError, ValueError) as exc:
        raise ShapeError("llm.checkpoint", f"config.json: bad or missing {exc}") from None


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


def _rope(cfg: dict[str, Any]) -> RopeSettings:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ShapeError("llm.checkpoint", f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeSettings(theta=theta)
    return RopeSettings(theta=theta, kind=kind, factor=float(params["factor"]),
                        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)))


def check_layout(shape: LlamaShape, tp: int, pp: int) -> None:
    """Raise ShapeError when (tp, pp) cannot split this shape evenly."""
    for what, n in (("num_attention_heads", shape.num_attention_heads),
                    ("num_key_value_heads", shape.num_key_value_heads),
                    ("intermediate_size", shape.intermediate_size)):
        if n % tp:
            raise ShapeError("parallel.tp", f"{what}={n} is not divisible by tp={tp}")
    if shape.num_hidden_layers < pp:
        raise ShapeError("parallel.pp", f"{shape.num_hidden_layers} layers cannot fill pp={pp} stages")


def stage_layers(layers: int, pp: int, pp_rank: int) -> range:
    """Contiguous layers of one stage; the first ``layers % pp`` stages take one extra."""
    per, extra = divmod(layers, pp)
    start = pp_rank * per + min(pp_rank, extra)
    return range(start, start + per + (1 if pp_rank < extra else 0))

