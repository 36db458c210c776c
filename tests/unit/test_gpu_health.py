"""GPU health (supervisor/gpu_health.py) on a fake NVML: what is read, what is unhealthy, how ranks map to GPUs, the
cache, and the metrics built from it. A real GPU's counters: tests/integration/test_gpu_faults.py (cuda)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from supervisor.gpu_health import GpuHealth, RankPlace, rank_place, read_gpus
from supervisor.observe.metrics import gpu_families
from tests.fake_nvml import API, CONSTANTS, FakeGpu, FakeNVML

H100 = "GPU-8a7c1e2b-0000-1111-2222-333344445555"


def test_the_fake_speaks_pynvml():
    """Every name the reader uses exists in nvidia-ml-py with the same constants (where it is installed here)."""
    pynvml = pytest.importorskip("pynvml")
    assert [name for name in API if not hasattr(pynvml, name)] == []
    assert {name: getattr(pynvml, name) for name in CONSTANTS} == CONSTANTS
    assert pynvml.NVML_ERROR_NOT_SUPPORTED == 3


def test_a_healthy_h100_reading():
    nvml = FakeNVML(FakeGpu(H100, pids=(11, 12), rows=(2, 0, 0, 0), reasons=0x1 | 0x4))
    (g,) = read_gpus(nvml)
    assert (g.index, g.uuid, g.pids) == (0, H100, (11, 12))
    assert (g.ecc_volatile, g.ecc_aggregate, g.retired_pages) == (0, 0, None)  # no page retirement on Hopper
    assert g.remapped_rows == {"correctable": 2, "uncorrectable": 0} and not g.remap_pending and not g.remap_failed
    assert g.throttle == ("gpu_idle", "sw_power_cap")
    assert g.problems() == [] and g.short == "sw_power_cap"


@pytest.mark.parametrize("gpu,problem,short", [
    (FakeGpu(H100, ecc={0: 2, 1: 5}), "2 uncorrectable ECC error(s) since the driver loaded (volatile)", "ECC 2"),
    (FakeGpu(H100, rows=(0, 1, 1, 0)), "a row remap is pending (needs a GPU reset)", "reset pending"),
    (FakeGpu(H100, rows=(0, 1, 0, 1)), "a row remap failed", "remap failed"),
    (FakeGpu(H100, rows=None, retired={1: [0x1000]}, retirement_pending=1),
     "a page retirement is pending (needs a GPU reset)", "reset pending"),
])
def test_what_makes_a_gpu_unhealthy(gpu, problem, short):
    (g,) = read_gpus(FakeNVML(gpu))
    assert g.problems() == [problem] and g.short == short


def test_old_errors_and_throttling_are_shown_not_judged():
    """An uncorrectable error of an earlier driver load (aggregate only), already retired, and a card held at its
    thermal limit: it still computes right."""
    (g,) = read_gpus(FakeNVML(FakeGpu(H100, ecc={0: 0, 1: 3}, retired={1: [1, 2]}, retirement_pending=0,
                                      rows=None, reasons=0x40)))
    assert g.problems() == [] and g.short == "hw_thermal"
    assert g.ecc_aggregate == 3 and g.retired_pages == {"multiple_single_bit": 0, "double_bit": 2}


def test_counters_a_gpu_does_not_support_are_none():
    (g,) = read_gpus(FakeNVML(FakeGpu("GPU-consumer", ecc=None, retired=None, rows=None)))
    assert (g.ecc_volatile, g.ecc_aggregate, g.retired_pages, g.remap_pending) == (None, None, None, None)
    assert g.problems() == [] and g.short == "ok"


def test_unhealthy_names_the_gpu_its_ranks_and_the_counter():
    nvml = FakeNVML(FakeGpu("GPU-a", pids=(100, 101)), FakeGpu("GPU-b", pids=(102, 103), ecc={0: 1, 1: 1}))
    health = GpuHealth(loader=lambda: nvml)
    places = [RankPlace(r, 100 + r) for r in range(4)]
    assert health.unhealthy(places) == [
        "GPU 1 (GPU-b) of ranks [2, 3]: 1 uncorrectable ECC error(s) since the driver loaded (volatile)"]
    assert {r: g.index for r, g in health.of_ranks(places).items()} == {0: 0, 1: 0, 2: 1, 3: 1}


def test_ranks_nvml_does_not_show_are_placed_by_their_visible_device(monkeypatch):
    """In a container's own pid namespace NVML shows host pids: a device=cuda rank is found by CUDA_VISIBLE_DEVICES."""
    nvml = FakeNVML(FakeGpu("GPU-a", pids=(9001,)), FakeGpu("GPU-bbbb-1234", pids=(9002,)))
    health = GpuHealth(loader=lambda: nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,0")
    spec = SimpleNamespace(env=(), local_rank=0)
    assert rank_place(0, 5, spec, "cuda") == RankPlace(0, 5, "GPU-bbbb")
    assert health.of_ranks([rank_place(0, 5, spec, "cuda")])[0].uuid == "GPU-bbbb-1234"
    spec_env = SimpleNamespace(env=(("CUDA_VISIBLE_DEVICES", "1"),), local_rank=0)  # runtime.env wins
    assert rank_place(0, 5, spec_env, "cuda").gpu_entry == "1"
    assert rank_place(0, 5, spec, "cpu") == RankPlace(0, 5)  # a CPU rank is on no GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert rank_place(3, 5, SimpleNamespace(env=(), local_rank=1), "cuda").gpu_entry == "1"


def test_readings_are_cached_for_the_ttl_and_nvml_loaded_once():
    nvml, loads = FakeNVML(FakeGpu(H100)), []
    health = GpuHealth(ttl_s=3600, loader=lambda: loads.append(1) or nvml)
    health.readings(), health.readings()
    assert (nvml.reads, len(loads)) == (1, 1)
    fresh = GpuHealth(ttl_s=0, loader=lambda: nvml)
    fresh.readings(), fresh.readings()
    assert nvml.reads == 3


def test_disabled_or_without_nvml_nothing_is_read():
    nvml = FakeNVML(FakeGpu(H100, ecc={0: 9, 1: 9}, pids=(1,)))
    assert GpuHealth(enabled=False, loader=lambda: nvml).unhealthy([RankPlace(0, 1)]) == [] and nvml.reads == 0
    assert GpuHealth(loader=lambda: None).readings() == []


def test_metric_families_of_the_readings():
    gpus = read_gpus(FakeNVML(FakeGpu(H100, ecc={0: 2, 1: 7}, rows=(1, 2, 1, 0), reasons=0x40 | 0x4)))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in gpu_families(gpus) for s in fam.samples}
    assert samples[("rankvisor_gpu_healthy", (("gpu", "0"), ("uuid", H100)))] == 0.0
    assert samples[("rankvisor_gpu_ecc_uncorrectable_total", (("counter", "volatile"), ("gpu", "0")))] == 2.0
    assert samples[("rankvisor_gpu_ecc_uncorrectable_total", (("counter", "aggregate"), ("gpu", "0")))] == 7.0
    assert samples[("rankvisor_gpu_remapped_rows", (("gpu", "0"), ("kind", "uncorrectable")))] == 2.0
    assert samples[("rankvisor_gpu_row_remap_pending", (("gpu", "0"),))] == 1.0
    assert samples[("rankvisor_gpu_throttle_reasons", (("gpu", "0"), ("reason", "hw_thermal")))] == 1.0
    assert samples[("rankvisor_gpu_throttle_reasons", (("gpu", "0"), ("reason", "gpu_idle")))] == 0.0
    assert not [k for k in samples if k[0] == "rankvisor_gpu_retired_pages"]  # not reported: left out, not 0
