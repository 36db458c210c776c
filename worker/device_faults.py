"""What a failed call did to this process's device, judged inside the worker right after the call raised.

Two kinds of GPU failure need more than "the call raised":

* a sticky CUDA error (a device-side assert, an illegal address, a launch failure): the CUDA context is poisoned and
  every later CUDA call in this process fails the same way, whichever library made the kernel. Nothing in the process can repair it; the rank must be
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
    """Whether the call that raised ``exc`` left this process's device unusable. Where this process has a CUDA
    context, the context itself is asked, whichever library raised (torch, Triton, CuPy): a poisoned one answers
    any call with its sticky error, a working one (after an invalid argument, a failed allocation, a Python error)
    does not. Without a context to ask (the error was raised by hand, or by a library with a context of its own), a
    CUDA error is taken as fatal."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return not _context_works(torch)
    return _is_cuda_error(exc)


def _context_works(torch) -> bool:
    """A stream query never blocks (unlike a synchronize, which would wait for a kernel that never ends)."""
    try:
        torch.cuda.current_stream().query()
    except Exception:  # noqa: BLE001 -- whatever it raises, the context no longer works
        return False
    return True


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
