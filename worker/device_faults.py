"""What a failed call did to this process's device, judged inside the worker right after the call raised.

Two kinds of GPU failure need more than "the call raised":

* a sticky CUDA error (a device-side assert, an illegal address, a launch failure): the CUDA context is poisoned and
  every later CUDA call in this process fails the same way. Nothing in the process can repair it; the rank must be
  replaced. ``is_fatal`` says so, and worker/main.py exits (EXIT_DEVICE_ERROR) right after replying.
* CUDA running out of memory: recoverable, the same process serves the next call. But the blocks the failed call
  allocated before the failing allocation stay cached by torch's allocator once its tensors are freed, so the
  device's memory stays above its level before the call; ``release_cached_memory`` hands them back to the driver.

torch is never imported here: a torch-free worker cannot hit either, and ``sys.modules`` tells whether it could.
"""
from __future__ import annotations

import gc
import sys

# torch raises a CUDA runtime error as torch.AcceleratorError (older releases: a RuntimeError) saying this.
_CUDA_ERROR_PREFIX = "CUDA error: "


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` left this process's device unusable. A CUDA runtime error is fatal when it is sticky: where
    this process has a CUDA context, a synchronize then fails too (a non-sticky one, e.g. an invalid argument or a
    failed cudaMalloc outside torch's allocator, does not, and the process keeps serving). Without a context to ask
    (the error was raised by hand, or by a library that manages its own), a CUDA error is taken as fatal."""
    if not _is_cuda_error(exc):
        return False
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return True
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 -- whatever it raises, the context no longer works
        return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocator could not find device memory for the call (``torch.OutOfMemoryError``)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(exc, oom)


def release_cached_memory() -> None:
    """Give the blocks torch's allocator caches back to the driver. Call it once the failed call's exception and
    frames are gone (outside the ``except`` block): the tensors they held are freed only then. A collection first,
    for tensors kept alive by a reference cycle through the traceback."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    gc.collect()
    torch.cuda.empty_cache()


def _is_cuda_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "AcceleratorError" or _CUDA_ERROR_PREFIX in str(exc)
