"""Prompts in, completions out: what a person sees of the Llama decoder, in workload=llm's run and in a serving
tree (POST /v1/completions: completions_http.py; prompts on stdin: completions_stdin.py).

::

    prompt text ── the checkpoint's tokenizer (if it has one) ──▶ ids ─┐
    prompt ids ────────────────────────────────────────────────────────┴─▶ Completer.complete
        ─▶ serving.Generator, one per tree (its leases keep one request per dp group; a group that fails mid-request
           is continued on another with the same tokens) ─▶ ids, cut after the first end-of-sequence id ─▶ text
        ─▶ RUN_DIR/completions.jsonl: one JSON object per prompt (CompletionLog), whoever asked

The tokenizer is transformers' AutoTokenizer on the checkpoint folder, loaded in the supervisor after READY (never
on the start-up path). Without one, prompts must be token ids and completions stay token ids.
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from supervisor.llm_checks import TOKENIZER_FILES

COMPLETIONS_FILE = "completions.jsonl"


# -- the tokenizer --------------------------------------------------------------------------------------------------
def load_tokenizer(checkpoint: str) -> Any | None:
    """The checkpoint folder's own tokenizer, or None when the folder has none or transformers is not installed."""
    if not any(os.path.isfile(os.path.join(checkpoint, f)) for f in TOKENIZER_FILES):
        return None
    if importlib.util.find_spec("transformers") is None:
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(checkpoint)


def eos_ids(checkpoint: str, tokenizer: Any | None) -> frozenset[int]:
    """The ids that end a sequence, where transformers' generate looks for them: generation_config.json, then
    config.json (an id or a list: Llama 3 has several), then the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(checkpoint, name), encoding="utf-8") as f:
                value = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if value is not None:
            return frozenset(value if isinstance(value, list) else [value])
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset() if eos is None else frozenset([eos])


# -- one answer -----------------------------------------------------------------------------------------------------
@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str = "length"  # "length": max tokens reached; "stop": an end-of-sequence id came (kept last)
    prompt: str | None = None  # the prompt's text, when it came as text
    text: str | None = None  # the completion decoded, when the checkpoint has a tokenizer
    extra: dict[str, Any] = field(default_factory=dict)  # source, group, seconds: for the record

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    def show(self) -> str:
        """One line for a person: the prompt and what the model said."""
        said = repr(self.text) if self.text is not None else f"ids {self.token_ids}"
        asked = repr(self.prompt) if self.prompt is not None else f"ids {self.prompt_ids}"
        return f"{asked} -> {said}"


def cut_at_stop(tokens: list[int], stop_ids: frozenset[int]) -> tuple[list[int], str]:
    """The tokens up to and including the first stop id, and why they end."""
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            return tokens[:i + 1], "stop"
    return tokens, "length"


class CompletionLog:
    """RUN_DIR/completions.jsonl: one JSON object per completion, appended as each is made (thread-safe)."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, COMPLETIONS_FILE) if run_dir else ""
        self.count = 0  # completions made (written or not)
        self._lock = threading.Lock()

    def write(self, completions: list[Completion]) -> None:
        lines = "".join(json.dumps({"time": round(time.time(), 3), **c.record()}) + "\n" for c in completions)
        with self._lock:
            self.count += len(completions)
            if self.path:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(lines)


# -- the service ----------------------------------------------------------------------------------------------------
class PromptError(ValueError):
    """A prompt the model cannot take (text without a tokenizer, ids outside the vocabulary, too long)."""


class Completer:
    """Completions from the tree's Llama decoder: prompts as text or ids, greedy, stopping at end-of-sequence.

    One per tree (``Completer.open``; ``Completer.of(sup)`` finds it): its Generator's leases are what keep two
    requests off one dp group's KV cache, so every caller of a tree -- HTTP threads, the stdin reader -- shares it."""

    _open: "weakref.WeakKeyDictionary[Any, Completer]" = weakref.WeakKeyDictionary()

    def __init__(self, sup: Any, checkpoint: str, tokenizer: Any | None, vocab_size: int,
                 max_positions: int) -> None:
        from supervisor.serving import Generator

        self.sup, self.checkpoint, self.tokenizer = sup, checkpoint, tokenizer
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.stop_ids = eos_ids(checkpoint, tokenizer)
        self.generator = Generator(sup)
        self.log = CompletionLog(sup.cfg.logging.run_dir)

    @classmethod
    def open(cls, sup: Any) -> "Completer":
        """Ask the tree which checkpoint it loaded, load that folder's tokenizer, and register for ``of``."""
        from worker.llm.shape import read_shape

        par = sup.cfg.parallel
        info = sup.collective_rpc("model_info", timeout=30, unique_reply_rank=(par.pp - 1) * par.tp)
        shape = read_shape(info["checkpoint"])
        completer = cls(sup, info["checkpoint"], load_tokenizer(info["checkpoint"]), shape.vocab_size,
                        shape.max_position_embeddings)
        cls._open[sup] = completer
        return completer

    @classmethod
    def of(cls, sup: Any) -> "Completer | None":
        return cls._open.get(sup)

    def close(self) -> None:
        """New requests are refused from now on (those under way finish)."""
        if Completer._open.get(self.sup) is self:
            del Completer._open[self.sup]

    @property
    def model(self) -> str:
        return os.path.basename(os.path.normpath(self.checkpoint))

    # -- prompts -------------------------------------------------------------------------------------------------
    def encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError(f"prompt: text needs a tokenizer, and {self.checkpoint} has none "
                                  f"({' / '.join(TOKENIZER_FILES)}): send token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise PromptError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return list(prompt)

    def decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- completions ---------------------------------------------------------------------------------------------
    def complete(self, prompts: list[Any], max_tokens: int, ignore_eos: bool = False, timeout: float | None = None,
                 source: str = "") -> list[Completion]:
        """Greedy completions of ``prompts`` (text or ids), as one request on one dp group (continued on another
        if that group fails); each stops after an end-of-sequence id unless ``ignore_eos``. Written to the log."""
        ids = [self.encode(p) for p in prompts]
        if not ids or any(not p for p in ids):
            raise PromptError("prompt: empty (give at least one token)")
        longest = max(map(len, ids))
        if longest + max_tokens > self.max_positions:
            raise PromptError(f"max_tokens: prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"model's {self.max_positions} positions")
        stop_ids = frozenset() if ignore_eos else self.stop_ids
        groups: list[int] = []
        t0 = time.perf_counter()
        rows = self.generator.generate(ids, max_tokens, timeout=timeout, stop_ids=stop_ids,
                                       on_step=lambda _op, group, _s: groups.append(group))
        extra = {"source": source, "group": groups[-1], "seconds": round(time.perf_counter() - t0, 4)}
        out = [self.completion(p, i, row, stop_ids, extra) for p, i, row in zip(prompts, ids, rows)]
        self.log.write(out)
        return out

    def completion(self, prompt: Any, prompt_ids: list[int], row: list[int], stop_ids: frozenset[int],
                   extra: dict[str, Any]) -> Completion:
        tokens, why = cut_at_stop(row, stop_ids)
        return Completion(prompt_ids, tokens, why, prompt if isinstance(prompt, str) else None, self.decode(tokens),
                          dict(extra))
