"""Hugging Face-format checkpoints: where a run's checkpoint lives, writing a seeded random one, reading slices.

Layout of a checkpoint folder (what transformers' ``save_pretrained`` writes for a LlamaForCausalLM)::

    config.json                      shape (see shape.py)
    model.safetensors                one file, or shards  model-00001-of-0000N.safetensors
    model.safetensors.index.json     with shards: {"weight_map": {tensor name: shard file}}

Reading: every rank opens the files with ``safe_open`` and takes only its slices through ``get_slice`` (the file is
memory-mapped, so a rank touches only the pages of its rows or columns): no rank ever builds a full copy.

Writing (presets): the tensors are drawn from a generator seeded by (seed, tensor name), so a checkpoint is the same
whoever writes it; the folder is written under a temporary name and renamed into place, under an exclusive lock,
so ranks (or runs) that start together write it once and never read a half-written one.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from worker.llm.shape import LlamaShape, preset

if TYPE_CHECKING:
    import torch

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "rankvisor", "llm")
SHARD_BYTES = 4 << 30  # shard size of written checkpoints: transformers' own default is 5 GB
INIT_STD = 0.02  # LlamaConfig.initializer_range: transformers initialises linear layers with this std
COMPLETE_MARK = "config.json"  # written last, so a folder with it is complete
INDEX_FILE = "model.safetensors.index.json"
WRITER_VERSION = 2  # part of a preset folder's name: bump when random_tensor changes, so old caches are not reused


# -- where ------------------------------------------------------------------------------------------------------
def cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))


def preset_dir(cache_dir: str, name: str, seed: int, dtype: str) -> Path:
    return cache_root(cache_dir) / f"{name}-seed{seed}-{dtype}-v{WRITER_VERSION}"


def resolve(checkpoint: str, preset_name: str, cache_dir: str, seed: int, dtype: str, device: str = "cpu") -> Path:
    """The checkpoint folder of a run: the given one, or the preset's, written first if it is not there yet."""
    if checkpoint:
        return Path(os.path.expanduser(checkpoint))
    path = preset_dir(cache_dir, preset_name, seed, dtype)
    ensure_random_checkpoint(path, preset(preset_name), seed, dtype, device)
    return path


# -- writing --------------------------------------------------------------------------------------------------------
def ensure_random_checkpoint(path: Path, shape: LlamaShape, seed: int, dtype: str, device: str = "cpu") -> None:
    """Write the seeded random checkpoint at ``path`` unless it is already complete (once, under a lock)."""
    if (path / COMPLETE_MARK).is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other ranks wait here, then find the folder complete
        if (path / COMPLETE_MARK).is_file():
            return
        tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_random_checkpoint(tmp, shape, seed, dtype, device)
            shutil.rmtree(path, ignore_errors=True)  # a leftover without config.json: incomplete
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def tensor_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LlamaForCausalLM checkpoint with its shape, in transformers' names and order."""
    h, hd = shape.hidden_size, shape.head_dim
    q, kv, inter = shape.num_attention_heads * hd, shape.num_key_value_heads * hd, shape.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                    p + "mlp.down_proj.weight": (h, inter),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def random_tensor(name: str, dims: tuple[int, ...], seed: int, dtype: str, device: str = "cpu") -> "torch.Tensor":
    """One tensor of the random checkpoint: matrices N(0, std), norms near 1 (not exactly 1, so a mix-up of two
    norm weights would show in the check). std is transformers' 0.02, or 1/sqrt(fan_in) where that is larger: at
    small widths 0.02 makes every attention nearly uniform, and rotary positions would barely matter to the check."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(dims) == 1:
        t = 1.0 + 0.1 * torch.randn(dims, generator=g, device=device)
    else:
        t = torch.randn(dims, generator=g, device=device) * max(INIT_STD, dims[1] ** -0.5)
    return t.to(getattr(torch, dtype)).cpu()


def write_random_checkpoint(path: Path, shape: LlamaShape, seed: int, dtype: str, device: str = "cpu") -> None:
    """Write a complete checkpoint of ``shape`` into the existing folder ``path`` (config.json last)."""
    from safetensors.torch import save_file

    shards = list(_plan_shards(tensor_shapes(shape), dtype))
    weight_map: dict[str, str] = {}
    for n, names in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, dims, seed, dtype, device) for name, dims in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    if len(shards) > 1:
        total = sum(_nbytes(d, dtype) for s in shards for _, d in s)
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / COMPLETE_MARK).write_text(json.dumps(shape.to_hf_config(dtype), indent=2))


def _nbytes(dims: tuple[int, ...], dtype: str) -> int:
    from worker.llm.shape import DTYPE_BYTES

    n = DTYPE_BYTES[dtype]
    for d in dims:
        n *= d
    return n


def _plan_shards(shapes: dict[str, tuple[int, ...]], dtype: str) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    shard: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for name, dims in shapes.items():
        nbytes = _nbytes(dims, dtype)
        if shard and size + nbytes > SHARD_BYTES:
            yield shard
            shard, size = [], 0
        shard.append((name, dims))
        size += nbytes
    if shard:
        yield shard


# -- reading --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fill:
    """One destination and the checkpoint slice that fills it: ``kind`` is full | rows | cols, and ``part`` of
    ``parts`` picks the slice (as SliceReader.rows / cols). ``dst`` may be a view (e.g. the q rows of a fused wqkv)."""

    dst: "torch.Tensor"
    name: str
    kind: str = "full"
    part: int = 0
    parts: int = 1


class SliceReader:
    """Reads tensors, or row / column ranges of them, from a checkpoint folder's safetensors files."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        self.files = files
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where: dict[str, Any] = {k: h for h in self._handles for k in h.keys()}

    def has(self, name: str) -> bool:
        return name in self._where

    def full(self, name: str) -> "torch.Tensor":
        return self._where[name].get_tensor(name)

    def rows(self, name: str, part: int, parts: int) -> "torch.Tensor":
        """Rows [part/parts, (part+1)/parts) of a matrix: a column-parallel layer's shard."""
        sl = self._slice(name)
        n = sl.get_shape()[0]
        return sl[part * n // parts:(part + 1) * n // parts]

    def cols(self, name: str, part: int, parts: int) -> "torch.Tensor":
        """Columns [part/parts, (part+1)/parts) of a matrix: a row-parallel layer's shard."""
        sl = self._slice(name)
        n = sl.get_shape()[1]
        return sl[:, part * n // parts:(part + 1) * n // parts]

    def read(self, fill: Fill) -> "torch.Tensor":
        """The CPU tensor of ``fill``'s slice."""
        if fill.kind == "full":
            return self.full(fill.name)
        return getattr(self, fill.kind)(fill.name, fill.part, fill.parts)

    def fill(self, fills: list[Fill]) -> None:
        """The plain path: each slice read into a CPU tensor, then copied into its destination (any device)."""
        for f in fills:
            f.dst.copy_(self.read(f))

    def _slice(self, name: str) -> Any:
        try:
            return self._where[name].get_slice(name)
        except KeyError:
            raise KeyError(f"checkpoint has no tensor {name!r}") from None

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()
