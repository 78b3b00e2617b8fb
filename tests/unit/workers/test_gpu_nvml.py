"""NVML health on a CPU-only host, against a fake pynvml (issue: GPU honesty, items 2, 6, 7):
which GPU is watched, which Xids count, what a lost GPU counts as, and the ECC baseline."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
import torch

from trainguard.workers.runtime.gpu import (
    HARDWARE_XIDS,
    EccBaseline,
    FakeNvmlGpuHealth,
    NvmlGpuHealth,
    drain_xid_events,
    is_hardware_xid,
    make_gpu_health,
    nvml_handle_for,
    nvml_uuid,
)

TIMEOUT, GPU_IS_LOST = 10, 15  # nvml.h return codes


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeEvent:
    eventData: int
    eventType: int = 0x8


class FakeEventQueue:
    """nvmlEventSetWait_v2 with a 0 ms timeout: the pending events, then a timeout (or `then`)."""

    def __init__(self, xids: list[int], then: int = TIMEOUT) -> None:
        self.xids, self.then = list(xids), then

    def wait(self) -> FakeEvent:
        if self.xids:
            return FakeEvent(self.xids.pop(0))
        raise FakeNVMLError(self.then)


# -- item 7: Xid filtering, timeout vs a lost GPU ---------------------------------------------------
def test_only_hardware_xids_count():
    assert {48, 63, 64, 74, 79, 92, 94, 95} <= HARDWARE_XIDS
    assert not any(is_hardware_xid(x) for x in (13, 31, 43, 45, 68, 109))
    q = FakeEventQueue([13, 79, 31, 43, 48])
    assert drain_xid_events(q.wait) == (2, False)


def test_a_timeout_is_no_event_but_any_other_nvml_error_is_a_lost_gpu():
    assert drain_xid_events(FakeEventQueue([]).wait) == (0, False)
    assert drain_xid_events(FakeEventQueue([94], then=GPU_IS_LOST).wait) == (1, True)
    assert drain_xid_events(FakeEventQueue([], then=999).wait) == (0, True)  # NVML_ERROR_UNKNOWN

    def broken():
        raise OSError("libnvidia-ml went away")

    assert drain_xid_events(broken) == (0, True)


def test_an_event_storm_does_not_hold_a_scrape_forever():
    assert drain_xid_events(lambda: FakeEvent(79), limit=50) == (50, False)


# -- item 6: ECC as the increase since the worker started -------------------------------------------
def test_ecc_errors_from_before_the_worker_started_do_not_count():
    ecc = EccBaseline()
    assert ecc.update(7) == 0  # errors since driver load: the baseline
    assert ecc.update(7) == 0
    assert ecc.update(9) == 2
    assert ecc.update(None) == 2  # a failed read is no news
    assert ecc.update(8) == 2  # a counter never goes back


def test_ecc_unsupported_at_start_takes_the_first_read_as_baseline():
    ecc = EccBaseline()
    assert ecc.update(None) == 0
    assert ecc.update(3) == 0 and ecc.update(4) == 1


# -- item 2: the GPU is found by UUID, never by the CUDA ordinal -------------------------------------
class FakeNvml(types.SimpleNamespace):
    """The pynvml calls NvmlGpuHealth makes, on a fake node of four GPUs."""

    NVML_ERROR_TIMEOUT = TIMEOUT
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    nvmlEventTypeXidCriticalError = 0x8

    def __init__(self, uuids: list[str], *, uuid_lookup_works: bool = True) -> None:
        super().__init__()
        self.uuids = uuids
        self.uuid_lookup_works = uuid_lookup_works
        self.looked_up: list[tuple[str, object]] = []
        self.events = FakeEventQueue([])
        self.ecc = {u: 0 for u in uuids}

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.looked_up.append(("uuid", uuid))
        if not self.uuid_lookup_works or uuid not in self.uuids:
            raise FakeNVMLError(6)  # NVML_ERROR_NOT_FOUND
        return uuid

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.looked_up.append(("index", index))
        return self.uuids[index]

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle, types_, es) -> None:
        pass

    def nvmlEventSetWait_v2(self, es, timeout_ms) -> FakeEvent:
        return self.events.wait()

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=50)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=1 << 30)

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type) -> int:
        return self.ecc[handle]


NODE = ["GPU-00000000-aaaa", "GPU-11111111-bbbb", "GPU-22222222-cccc", "GPU-33333333-dddd"]


@pytest.fixture
def fake_node(monkeypatch):
    """A 1-GPU Ray actor holding physical GPU 2: its only CUDA device, ordinal 0, is GPU 2.
    torch prints the UUID without NVML's "GPU-" prefix."""
    nvml = FakeNvml(NODE)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    props = types.SimpleNamespace(uuid=NODE[2][len("GPU-"):], name="Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda device: 2, raising=False)
    return nvml


def test_nvml_watches_the_ranks_own_gpu_not_physical_gpu_0(fake_node):
    gpu = NvmlGpuHealth(torch.device("cuda", 0))
    assert gpu._handle == NODE[2]
    assert fake_node.looked_up == [("uuid", NODE[2])]


def test_nvml_falls_back_to_the_nvml_index_when_the_uuid_is_not_found(fake_node):
    fake_node.uuid_lookup_works = False
    gpu = NvmlGpuHealth(torch.device("cuda", 0))
    assert gpu._handle == NODE[2]
    assert fake_node.looked_up == [("uuid", NODE[2]), ("index", 2)]


def test_nvml_uuid_spelling():
    assert nvml_uuid("1234-abcd") == "GPU-1234-abcd"
    assert nvml_uuid("GPU-1234") == "GPU-1234" and nvml_uuid("MIG-9") == "MIG-9"
    with pytest.raises(RuntimeError, match="cannot find"):
        nvml_handle_for(FakeNvml(NODE, uuid_lookup_works=False), uuid="nope", nvml_index=None)


def test_nvml_sample_counts_hardware_xids_a_lost_gpu_once_and_new_ecc_errors(fake_node):
    fake_node.ecc[NODE[2]] = 5  # errors from before this worker started
    gpu = NvmlGpuHealth(torch.device("cuda", 0))
    s = gpu.sample()
    assert (s.xid_errors, s.ecc_errors, s.utilization_ratio) == (0, 0, 0.5)
    fake_node.events = FakeEventQueue([13, 43, 79])
    fake_node.ecc[NODE[2]] = 6
    s = gpu.sample()
    assert (s.xid_errors, s.ecc_errors) == (1, 1)
    fake_node.events = FakeEventQueue([], then=GPU_IS_LOST)
    assert gpu.sample().xid_errors == 2
    assert gpu.sample().xid_errors == 2  # counted once, not at every scrape
    gpu.inject_xid(2)
    assert gpu.sample().xid_errors == 4


def test_a_process_without_a_gpu_gets_the_fake():
    assert isinstance(make_gpu_health(), FakeNvmlGpuHealth)
    assert isinstance(make_gpu_health(torch.device("cpu")), FakeNvmlGpuHealth)
