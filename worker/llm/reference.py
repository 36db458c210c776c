"""The check: transformers' own ``LlamaForCausalLM.generate`` (greedy) on the same checkpoint folder.

``python -m worker.llm.reference DEATH_FD`` runs it in a process of its own: it reads the request (one JSON document)
on stdin and prints one JSON line ``{"tokens": [[...], ...], "seconds": s}``: the supervisor never imports transformers
or initialises CUDA itself. DEATH_FD is the read end of the supervisor's death pipe: this process leaves when the
supervisor does, even by SIGKILL (EOF there, and PR_SET_PDEATHSIG), as a worker does (worker/lifeline.py).
Prompts of different lengths are left-padded with an attention mask, as transformers expects for generation.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

PAD_TOKEN = 0  # any id: masked out


def load_hf(path: str, dtype: str = "float32", device: str = "cpu") -> Any:
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    model.generation_config.eos_token_id = None  # fixed-length greedy runs, like ours: never stop early
    return model


def hf_generate(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import torch

    t = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_TOKEN] * (t - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD_TOKEN,
                             eos_token_id=None)
    return out[:, t:].tolist()


def die_with_parent(death_fd: int) -> None:
    """EOF on the death pipe ends this process (and anything it started) at once; PR_SET_PDEATHSIG too."""
    from multiprocessing.connection import Connection

    from worker import lifeline
    from worker.protocol import EXIT_ORPHANED

    lifeline.arm_parent_death_signal(signal.SIGKILL)  # first: a second thread running tells it is armed (tests)
    death = Connection(death_fd, writable=False)
    lifeline.DeathWatch(death, 0.0, lambda: None, EXIT_ORPHANED, EXIT_ORPHANED).start()


def main(argv: list[str]) -> int:
    die_with_parent(int(argv[0]))  # before the imports of torch and transformers: they take seconds
    req = json.load(sys.stdin)
    model = load_hf(req["checkpoint"], req.get("dtype", "float32"), req.get("device", "cpu"))
    t0 = time.perf_counter()
    tokens = hf_generate(model, req["prompts"], req["max_new_tokens"])
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
