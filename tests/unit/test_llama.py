"""The Llama decoder in one process (tp = pp = 1) against transformers' LlamaForCausalLM on the same random
checkpoint (float32, greedy, token for token), and the pieces the distributed ranks rely on: sliced reads, shapes,
layout checks, stage splits."""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from worker.llm.checkpoint import SliceReader, ensure_random_checkpoint, tensor_shapes  # noqa: E402
from worker.llm.engine import generate, local_engine  # noqa: E402
from worker.llm.reference import hf_generate, load_hf  # noqa: E402
from worker.llm.shape import (PRESETS, RopeSettings, ShapeError, check_layout, preset, read_shape,  # noqa: E402
                              shape_from_hf_config, stage_layers)

NEW_TOKENS = 24
TINY = preset("tiny")
# Variants that take the other branches: tied embeddings with plain rotary, and multi-head (not grouped) attention.
SHAPES = {
    "tiny": TINY,
    "tied-default-rope": replace(TINY, tie_word_embeddings=True, rope=RopeSettings(theta=10000.0)),
    "mha": replace(TINY, num_key_value_heads=TINY.num_attention_heads, num_hidden_layers=2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    out = {}
    for name, shape in SHAPES.items():
        out[name] = root / name
        ensure_random_checkpoint(out[name], shape, seed=3, dtype="float32")
    return out


def _prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_tokens_identical_to_transformers(checkpoints, name: str) -> None:
    path = checkpoints[name]
    prompts = _prompts([11, 7, 11, 3], TINY.vocab_size)  # different lengths: the left-padding path too
    ours = generate(local_engine(path, batch=len(prompts), max_seq=11 + NEW_TOKENS), prompts, NEW_TOKENS)
    ref = hf_generate(load_hf(str(path)), prompts, NEW_TOKENS)
    assert ours == ref
    assert len({tuple(r) for r in ours}) > 1  # the rows really differ: a constant output would prove nothing


def test_a_second_prefill_reuses_the_engine_and_grows_the_cache(checkpoints) -> None:
    path = checkpoints["tiny"]
    engine = local_engine(path, batch=1, max_seq=8)  # too small for what follows: prefill must grow it
    first = generate(engine, _prompts([5], TINY.vocab_size, seed=1), 4)
    prompts = _prompts([9, 9, 9], TINY.vocab_size, seed=2)
    assert generate(engine, prompts, NEW_TOKENS) == hf_generate(load_hf(str(path)), prompts, NEW_TOKENS)
    assert generate(engine, _prompts([5], TINY.vocab_size, seed=1), 4) == first


def test_weights_differ_between_tensors_and_seeds(checkpoints, tmp_path: Path) -> None:
    reader = SliceReader(checkpoints["tiny"])
    q0, q1 = reader.full("model.layers.0.self_attn.q_proj.weight"), reader.full("model.layers.1.self_attn.q_proj.weight")
    assert not torch.equal(q0, q1)
    ensure_random_checkpoint(tmp_path / "other", TINY, seed=4, dtype="float32")
    assert not torch.equal(q0, SliceReader(tmp_path / "other").full("model.layers.0.self_attn.q_proj.weight"))


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_row_and_column_slices_tile_the_full_tensor(checkpoints, parts: int) -> None:
    reader = SliceReader(checkpoints["tiny"])
    name = "model.layers.2.mlp.down_proj.weight"  # [hidden, intermediate]
    full = reader.full(name)
    rows = [reader.rows(name, r, parts) for r in range(parts)]
    cols = [reader.cols(name, r, parts) for r in range(parts)]
    assert all(r.shape == (full.shape[0] // parts, full.shape[1]) for r in rows)
    assert all(c.shape == (full.shape[0], full.shape[1] // parts) for c in cols)
    assert torch.equal(torch.cat(rows, 0), full) and torch.equal(torch.cat(cols, 1), full)


def test_checkpoint_has_transformers_names_and_shapes(checkpoints) -> None:
    reader = SliceReader(checkpoints["tied-default-rope"])
    expected = tensor_shapes(SHAPES["tied-default-rope"])
    assert "lm_head.weight" not in expected  # tied: the head is the embedding
    for name, dims in expected.items():
        assert tuple(reader.full(name).shape) == dims


def test_written_config_reads_back_as_the_same_shape(checkpoints) -> None:
    for name, shape in SHAPES.items():
        assert read_shape(str(checkpoints[name])) == shape


def test_preset_shapes_are_the_public_models() -> None:
    assert PRESETS["llama-3.1-8b"].total_params() == 8_030_261_248  # Llama 3.1 8B's published count
    assert PRESETS["llama-3.2-1b"].total_params() == 1_235_814_400  # Llama 3.2 1B's (tied head)


@pytest.mark.parametrize(("patch", "key", "words"), [
    ({"model_type": "gpt2"}, "llm.checkpoint", "not Llama-family"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "llm.checkpoint", "yarn"),
    ({"attention_bias": True}, "llm.checkpoint", "attention_bias"),
    ({"num_attention_heads": None}, "llm.checkpoint", "bad or missing"),
])
def test_unsupported_configs_are_named(patch: dict, key: str, words: str) -> None:
    cfg = {**TINY.to_hf_config("float32"), **patch}
    with pytest.raises(ShapeError) as err:
        shape_from_hf_config(cfg)
    assert err.value.key == key and words in str(err.value)


def test_transformers5_rope_parameters_spelling_is_read() -> None:
    cfg = TINY.to_hf_config("float32")
    rope = {**cfg.pop("rope_scaling"), "rope_theta": cfg.pop("rope_theta")}
    assert shape_from_hf_config({**cfg, "rope_parameters": rope}) == TINY


@pytest.mark.parametrize(("tp", "pp", "key"), [(3, 1, "parallel.tp"), (8, 1, "parallel.tp"), (1, 5, "parallel.pp")])
def test_layouts_that_cannot_split_the_model(tp: int, pp: int, key: str) -> None:
    with pytest.raises(ShapeError) as err:
        check_layout(TINY, tp, pp)
    assert err.value.key == key


@pytest.mark.parametrize(("layers", "pp"), [(4, 2), (5, 2), (32, 3), (3, 3)])
def test_stages_cover_every_layer_once(layers: int, pp: int) -> None:
    got = [i for s in range(pp) for i in stage_layers(layers, pp, s)]
    assert got == list(range(layers))


def test_config_json_is_what_transformers_loads(checkpoints) -> None:
    cfg = json.loads((checkpoints["tiny"] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["rope_scaling"]["rope_type"] == "llama3"
