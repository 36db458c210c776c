"""The Llama decoder's configuration check, run in the parent before anything is spawned (supervisor/config.py's
``validate`` calls it for workload=llm, and for workload=serve with worker=llm): the shape of the checkpoint or
preset (Llama-family? heads, kv-heads and MLP columns divisible by tp? layers >= pp?), the prompts against the
vocabulary and positions, whether the weights plus the KV cache fit each device, and that the folder holds
safetensors. Apart from the run (supervisor/llm_workload.py) so that checking a config never imports the API that
runs one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.core.topology import resolve_device
from supervisor.errors import ConfigError
from worker.llm.shape import DTYPE_BYTES, LlamaShape, ShapeError, check_layout, preset, read_shape

if TYPE_CHECKING:
    from supervisor.settings import Config

DTYPES = ("auto", *DTYPE_BYTES)
MEMORY_HEADROOM = 0.9  # plan to use at most this share of a device's free memory (activations, allocator slack)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
LLM_WORKER = "worker.llm.worker:LLMWorker"  # what worker=llm selects (conf/worker/llm.yaml)


def runs_llm(cfg: "Config") -> bool:
    """The tree runs the Llama decoder: workload=llm, or another workload (serve) with worker=llm."""
    return str(cfg.workload.name) == "llm" or cfg.worker.cls == LLM_WORKER


def check_config(cfg: "Config", visible_gpus: int | None = None) -> None:
    """Raise ConfigError (one line, exit 2 from the CLI) for an llm run that cannot work."""
    llm = cfg.llm
    _require(llm.dtype in DTYPES, "llm.dtype", f"must be one of {', '.join(DTYPES)}, got {llm.dtype!r}")
    for key in ("batch", "max_new_tokens", "prompt_len"):
        _require(getattr(llm, key) >= 1, f"llm.{key}", f"must be >= 1, got {getattr(llm, key)}")
    try:
        shape = _shape(llm)
        check_layout(shape, cfg.parallel.tp, cfg.parallel.pp)
    except ShapeError as exc:
        raise ConfigError(exc.key, exc.problem) from None
    _check_prompts(llm, shape)
    _check_memory(cfg, shape)
    _check_weights(llm)


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _shape(llm: Any) -> LlamaShape:
    if not llm.checkpoint:
        return preset(llm.preset)
    path = os.path.expanduser(llm.checkpoint)
    _require(os.path.isdir(path), "llm.checkpoint", f"{llm.checkpoint!r} is not a directory")
    return read_shape(path)


def _check_weights(llm: Any) -> None:
    """config.json alone describes a shape (checked above); the ranks load safetensors."""
    if llm.checkpoint:
        _require(any(Path(os.path.expanduser(llm.checkpoint)).glob("*.safetensors")), "llm.checkpoint",
                 f"no *.safetensors in {llm.checkpoint!r} (weights load from safetensors only)")


def _check_prompts(llm: Any, shape: LlamaShape) -> None:
    bad = [t for t in llm.prompt_ids if not 0 <= t < shape.vocab_size]
    _require(not bad, "llm.prompt_ids", f"token id {bad[:1]} is outside the vocabulary (0..{shape.vocab_size - 1})")
    prompt = _longest_prompt(llm, shape)
    need = prompt + llm.max_new_tokens
    _require(llm.max_seq_len == 0 or llm.max_seq_len >= need, "llm.max_seq_len",
             f"{llm.max_seq_len} is shorter than the longest prompt ({prompt} tokens) plus llm.max_new_tokens "
             f"({llm.max_new_tokens}): {need}")
    _require(need <= shape.max_position_embeddings, "llm.max_new_tokens",
             f"prompt + new tokens = {need} exceeds the model's {shape.max_position_embeddings} positions")


def _longest_prompt(llm: Any, shape: LlamaShape) -> int:
    """Tokens in the longest prompt. The worker plans TEXT_PROMPT_BOUND tokens for text it has not seen, but that is
    not the prompt's length: a check that depends on it (an llm.max_seq_len given, or a generation long enough to
    reach the model's positions) tokenizes the text, as the run will. Otherwise the tokenizer stays off the
    start-up path (supervisor/completions.py loads it after READY)."""
    from worker.llm.worker import planned_prompt_len

    planned = planned_prompt_len(llm)
    if not llm.prompt_text:
        return planned
    folder = os.path.expanduser(llm.checkpoint) if llm.checkpoint else ""
    has = folder and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)
    _require(bool(has), "llm.prompt_text", "needs a tokenizer in llm.checkpoint's folder; give llm.prompt_ids")
    if not llm.max_seq_len and planned + llm.max_new_tokens <= shape.max_position_embeddings:
        return planned  # no check can fail on it
    from supervisor.completions import load_tokenizer  # here: completions imports this module

    tok = load_tokenizer(folder)
    _require(tok is not None, "llm.prompt_text", "needs transformers to tokenize (pip install -e '.[llm]'); "
                                                 "give llm.prompt_ids")
    return max(len(tok(text)["input_ids"]) for text in llm.prompt_text)


def _check_memory(cfg: "Config", shape: LlamaShape) -> None:
    from worker.llm.worker import planned_prompt_len, resolve_dtype

    llm, par = cfg.llm, cfg.parallel
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(llm.dtype, device)
    max_seq = llm.max_seq_len or planned_prompt_len(llm) + llm.max_new_tokens
    per_rank = shape.rank_bytes(par.tp, par.pp, dtype, llm.batch, max_seq)
    if device == "cuda":
        free = _gpu_free_bytes(min(par.group_world, max(1, _gpu_count())))
        where, need = "the emptiest GPU's free memory", per_rank
    else:
        import psutil

        free, where, need = psutil.virtual_memory().available, "available host memory", per_rank * par.total
    if free is None:
        return  # no NVML: nothing to measure against (the load itself would then fail with CUDA's own error)
    _require(need <= free * MEMORY_HEADROOM, "llm.preset" if not llm.checkpoint else "llm.checkpoint",
             f"{_gib(need)} of weights + KV cache ({dtype}, tp={par.tp} pp={par.pp}, batch {llm.batch}) "
             f"do not fit in {_gib(free)} of {where}")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _gpu_count() -> int:
    from supervisor import gpu

    return gpu.device_count()


def _gpu_free_bytes(n: int) -> int | None:
    """The smallest free memory over GPUs 0..n-1, from NVML (no CUDA context in the supervisor)."""
    import ctypes

    from supervisor import gpu

    frees = []
    for index in range(n):
        handle = gpu._handle(index)  # reuse gpu.py's NVML binding; it has no public free-memory reader yet
        mem = gpu._Memory()
        if handle is None or gpu._nvml().nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
            return None
        frees.append(mem.free)
    return min(frees) if frees else None
