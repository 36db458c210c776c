"""What a failed call did to the worker's device (worker/device_faults.py, worker/main.py's dispatch), judged without a
GPU: torch's CUDA entry points are replaced by recorders. The real GPU: tests/integration/test_gpu_faults.py (cuda)."""
from __future__ import annotations

import weakref

import pytest
import torch

from worker import device_faults
from worker.main import dispatch
from worker.protocol import RemoteFailure

ASSERT = "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported at some other"


class Held:
    """Stands for the tensors a failed call held."""


@pytest.fixture
def cuda(monkeypatch):
    """A CUDA context 'exists'; whether it answers with a sticky error, and when empty_cache runs, are the test's."""
    state = {"poisoned": None, "emptied": []}

    class Stream:
        def query(self):
            if state["poisoned"] is not None:
                raise state["poisoned"]
            return True

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *_: Stream())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state["emptied"].append(state["probe"]()))
    return state


class OomWorker:
    def __init__(self, state) -> None:
        self.state = state

    def step(self):
        held = Held()
        self.state["probe"] = lambda r=weakref.ref(held): r() is None  # True once the call's objects are freed
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 78.40 GiB is free.")


def test_oom_hands_cached_blocks_back_once_the_failed_calls_frames_are_gone(cuda):
    ok, failure = dispatch(OomWorker(cuda), "step", (), {}, rank=3)
    assert not ok and (failure.rank, failure.exc_type, failure.fatal) == (3, "OutOfMemoryError", False)
    assert failure.message.startswith("CUDA out of memory. Tried to allocate 1024.00 GiB")
    assert cuda["emptied"] == [True]  # emptied once, after the call's tensors were released


def test_oom_release_can_be_turned_off(cuda):
    dispatch(OomWorker(cuda), "step", (), {}, rank=0, release_on_oom=False)
    assert cuda["emptied"] == []


def test_a_sticky_cuda_error_is_fatal(cuda):
    """A device-side assert poisons the context: asked, it answers with the same error."""
    cuda["poisoned"] = torch.AcceleratorError(ASSERT)

    def boom(_w):
        raise torch.AcceleratorError(ASSERT)

    import cloudpickle

    ok, failure = dispatch(object(), cloudpickle.dumps(boom), (), {}, rank=1)
    assert not ok and failure.fatal and failure.cause == "CUDA error: device-side assert triggered"


def test_a_cuda_error_that_leaves_the_context_working_is_not_fatal(cuda):
    """e.g. an invalid argument: the context still answers, so the same process serves the next call."""
    assert not device_faults.is_fatal(torch.AcceleratorError("CUDA error: invalid argument"))
    assert cuda["emptied"] == []


def test_a_poisoned_context_is_fatal_whoever_raised(cuda):
    """CuPy or Triton word an illegal address their own way: the context's answer decides, not the words."""
    cuda["poisoned"] = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    assert device_faults.is_fatal(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))


def test_without_a_context_a_cuda_error_is_taken_as_fatal(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert device_faults.is_fatal(torch.AcceleratorError(ASSERT))
    assert device_faults.is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not device_faults.is_fatal(RuntimeError("shape mismatch"))
    assert not device_faults.is_fatal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


def test_remote_failure_cause_is_the_first_line():
    assert RemoteFailure(0, "AcceleratorError", "\n" + ASSERT, "").cause == "CUDA error: device-side assert triggered"
    assert RemoteFailure(0, "MemoryError", "", "").cause == "MemoryError"
