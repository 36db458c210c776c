"""worker/llm/fastload.py on CPU: its own header parsing, byte ranges and buffer scheduling give every parameter the
same bytes as the plain path (SliceReader), with a fake device copy that, like cudaMemcpyAsync, runs late: only when
the scheduler waits for the buffer, or at the end. A buffer refilled before its copies finished shows as wrong bytes."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

from worker.llm import checkpoint, fastload  # noqa: E402
from worker.llm.checkpoint import Fill, SliceReader, ensure_random_checkpoint  # noqa: E402
from worker.llm.model import Alloc, Parallel, Stage, stage_fills  # noqa: E402
from worker.llm.shape import preset  # noqa: E402

TINY = preset("tiny")
SHARD_BYTES = 64 << 10  # several shards, so that slices come from different files
BUFFER_BYTES = 3000  # far smaller than a tensor: tensors cut across buffers, buffers reused many times
JOB_BYTES = 700  # and each buffer load read by several jobs


class DeferredStaging:
    """CPU buffers; a 'device copy' is only queued, and runs when its buffer is waited on (or at the end)."""

    def __init__(self, count: int, nbytes: int, honour_wait: bool = True) -> None:
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(count)]
        self.honour_wait = honour_wait
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.marked: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(count)]
        self.loads = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.pending.append((dst, src))

    def mark(self, i: int) -> None:
        self.marked[i] += self.pending
        self.pending = []
        self.loads += 1

    def wait(self, i: int) -> None:
        if self.honour_wait:
            self._run(i)

    def finish(self) -> None:
        for i in range(len(self.marked)):
            self._run(i)

    def _run(self, i: int) -> None:
        for dst, src in self.marked[i]:
            dst.copy_(src)
        self.marked[i] = []


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fastload")
    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint, "SHARD_BYTES", SHARD_BYTES)
    try:
        out = {}
        for dtype in ("bfloat16", "float32"):
            out[dtype] = root / dtype
            ensure_random_checkpoint(out[dtype], TINY, seed=5, dtype=dtype)
    finally:
        mp.undo()
    assert len(list(out["float32"].glob("*.safetensors"))) > 2
    return out


def _stage(tp: int, rank: int, dtype: torch.dtype) -> tuple[Stage, Parallel]:
    par = Parallel(tp=tp, tp_rank=rank)
    stage = Stage(TINY, par, TINY.num_hidden_layers, Alloc(dtype, torch.device("cpu")))
    for p in stage.parameters():
        p.data.fill_(float("nan"))  # nothing left unwritten can pass for loaded
    return stage, par


def _load(path: Path, tp: int, rank: int, dtype: torch.dtype, staging=None) -> tuple[Stage, dict]:
    stage, par = _stage(tp, rank, dtype)
    reader = SliceReader(path)
    fills = stage_fills(stage, TINY, par, range(TINY.num_hidden_layers))
    with torch.no_grad():
        if staging is None:
            reader.fill(fills)
            return stage, {}
        stats = fastload.fill(reader, fills, torch.device("cpu"), staging=staging, job_bytes=JOB_BYTES,
                              buffer_bytes=BUFFER_BYTES, threads=3)
    return stage, stats


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                       b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_staged_load_gives_every_parameter_the_plain_paths_bytes(ckpts, tp: int, dtype: str) -> None:
    for rank in range(tp):
        plain, _ = _load(ckpts[dtype], tp, rank, getattr(torch, dtype))
        staging = DeferredStaging(3, BUFFER_BYTES)
        fast, stats = _load(ckpts[dtype], tp, rank, getattr(torch, dtype), staging)
        expected = dict(plain.named_parameters())
        got = dict(fast.named_parameters())
        assert expected.keys() == got.keys()
        for name, want in expected.items():
            assert _same_bytes(got[name], want), name
        total = sum(p.numel() * p.element_size() for p in plain.parameters())
        assert stats["bytes"] == total and stats["plain_s"] >= 0  # every byte went through the buffers
        assert staging.loads > 3 * len(staging.buffers)  # each buffer was refilled many times


def test_a_buffer_refilled_before_its_copies_finish_shows_as_wrong_bytes(ckpts) -> None:
    """The check above can fail: a scheduler that did not wait for a buffer's copies would corrupt the weights."""
    plain, _ = _load(ckpts["bfloat16"], 2, 1, torch.bfloat16)
    fast, _ = _load(ckpts["bfloat16"], 2, 1, torch.bfloat16, DeferredStaging(3, BUFFER_BYTES, honour_wait=False))
    assert any(not _same_bytes(a, b) for a, b in zip(fast.parameters(), plain.parameters()))


def test_a_dtype_conversion_takes_the_plain_path(ckpts) -> None:
    plain, _ = _load(ckpts["float32"], 2, 0, torch.bfloat16)
    fast, stats = _load(ckpts["float32"], 2, 0, torch.bfloat16, DeferredStaging(2, BUFFER_BYTES))
    assert stats["bytes"] == 0
    assert all(_same_bytes(a, b) for a, b in zip(fast.parameters(), plain.parameters()))


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_row_and_column_slices_of_uneven_parts(ckpts, parts: int) -> None:
    reader = SliceReader(ckpts["float32"])
    name = "model.layers.1.mlp.down_proj.weight"  # [64, 128]: thirds are uneven (part * n // parts)
    for kind in ("rows", "cols"):
        for part in range(parts):
            want = getattr(reader, kind)(name, part, parts)
            dst = torch.full(want.shape, float("nan"))
            fastload.fill(reader, [Fill(dst, name, kind, part, parts)], torch.device("cpu"),
                          staging=DeferredStaging(2, 256), buffer_bytes=256, job_bytes=100, threads=2)
            assert _same_bytes(dst, want), (kind, part)


def test_header_gives_each_tensors_dtype_shape_and_bytes(ckpts) -> None:
    reader = SliceReader(ckpts["bfloat16"])
    entries = {}
    for f in reader.files:
        entries.update(fastload.read_header(f))
    assert set(entries) == set(checkpoint.tensor_shapes(TINY))
    e = entries["model.layers.0.self_attn.k_proj.weight"]
    assert e.dtype == "BF16" and e.shape == (TINY.num_key_value_heads * TINY.head_dim, TINY.hidden_size)
    with open(e.file, "rb") as f:
        f.seek(e.begin)
        raw = f.read(e.nbytes)
    assert raw == reader.full("model.layers.0.self_attn.k_proj.weight").reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_file_that_is_not_safetensors_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        fastload.read_header(bad)


def test_a_missing_tensor_is_named(ckpts) -> None:
    reader = SliceReader(ckpts["float32"])
    with pytest.raises(KeyError, match="no_such"):
        fastload.fill(reader, [Fill(torch.empty(3), "no_such.weight")], torch.device("cpu"),
                      staging=DeferredStaging(1, 64))


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    """Skip without a GPU; otherwise create the CUDA context (and pinned memory, a stream) before the per-test leak
    baseline: the driver's descriptors stay open for the whole session and are not the loader's."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device("cuda")
    with torch.cuda.stream(torch.cuda.Stream(dev)):
        torch.zeros(1, device=dev).copy_(torch.ones(1).pin_memory(), non_blocking=True)
    torch.cuda.synchronize()
    return dev


@pytest.mark.cuda
@pytest.mark.parametrize("tp", [1, 2])
def test_on_a_gpu_pinned_buffers_and_async_copies_give_the_plain_paths_bytes(ckpts, cuda, tp: int) -> None:
    """The real thing (CudaStaging: pinned buffers, a side stream, events), with small buffers so that each is
    refilled many times while copies may still be in flight."""
    dev = cuda
    for rank in range(tp):
        plain, _ = _load(ckpts["bfloat16"], tp, rank, torch.bfloat16)
        stage, par = _stage(tp, rank, torch.bfloat16)
        stage.to(dev)
        with torch.no_grad():
            fastload.fill(SliceReader(ckpts["bfloat16"]), stage_fills(stage, TINY, par, range(TINY.num_hidden_layers)),
                          dev, buffer_bytes=BUFFER_BYTES, job_bytes=JOB_BYTES, threads=3)
        for (name, want), got in zip(plain.named_parameters(), stage.parameters()):
            assert _same_bytes(got.cpu(), want), name
