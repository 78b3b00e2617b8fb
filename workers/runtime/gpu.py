"""GPU health: a Protocol with an NVML implementation and a fake one for CPU-only hosts.

The fake's Xid/ECC counters move only when a fault is injected (the gpu_xid fault),
so the supervisor's GPU-fault path can be exercised without hardware.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["GpuSample", "GpuHealth", "NvmlGpuHealth", "FakeNvmlGpuHealth", "make_gpu_health"]


@dataclass(frozen=True)
class GpuSample:
    utilization_ratio: float  # 0..1
    memory_used_bytes: int
    xid_errors: int  # cumulative
    ecc_errors: int  # cumulative (uncorrected, volatile)


@runtime_checkable
class GpuHealth(Protocol):
    name: str

    def sample(self) -> GpuSample: ...

    def inject_xid(self, n: int = 1) -> None: ...


class FakeNvmlGpuHealth:
    """Fake NVML: zero utilisation, no memory, counters that only injected faults raise."""

    name = "fake-nvml"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._xid = 0
        self._ecc = 0

    def sample(self) -> GpuSample:
        with self._lock:
            return GpuSample(0.0, 0, self._xid, self._ecc)

    def inject_xid(self, n: int = 1) -> None:
        with self._lock:
            self._xid += n

    def inject_ecc(self, n: int = 1) -> None:
        with self._lock:
            self._ecc += n


class NvmlGpuHealth:
    """Real NVML (nvidia-ml-py) for one device. Xid events are read from the event set
    when the driver supports it; injected Xids (fault tests on real GPUs) add on top."""

    name = "nvml"

    def __init__(self, index: int = 0) -> None:
        import pynvml  # nvidia-ml-py

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._lock = threading.Lock()
        self._injected_xid = 0
        self._xid = 0
        self._events = None
        try:
            es = pynvml.nvmlEventSetCreate()
            pynvml.nvmlDeviceRegisterEvents(self._handle, pynvml.nvmlEventTypeXidCriticalError, es)
            self._events = es
        except Exception:  # noqa: BLE001 - not supported on every driver / in containers
            self._events = None

    def _drain_xid(self) -> None:
        if self._events is None:
            return
        while True:
            try:
                self._nvml.nvmlEventSetWait_v2(self._events, 0)
            except Exception:  # noqa: BLE001 - NVML_ERROR_TIMEOUT: no pending event
                return
            self._xid += 1

    def sample(self) -> GpuSample:
        n = self._nvml
        with self._lock:
            self._drain_xid()
            try:
                util = n.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0
            except Exception:  # noqa: BLE001
                util = 0.0
            try:
                mem = int(n.nvmlDeviceGetMemoryInfo(self._handle).used)
            except Exception:  # noqa: BLE001
                mem = 0
            try:
                ecc = int(n.nvmlDeviceGetTotalEccErrors(
                    self._handle, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC))
            except Exception:  # noqa: BLE001 - ECC off or unsupported
                ecc = 0
            return GpuSample(util, mem, self._xid + self._injected_xid, ecc)

    def inject_xid(self, n: int = 1) -> None:
        with self._lock:
            self._injected_xid += n


def make_gpu_health(device_index: int | None = None) -> GpuHealth:
    """NVML when CUDA is present and NVML initialises, the fake otherwise."""
    try:
        import torch

        if torch.cuda.is_available():
            idx = torch.cuda.current_device() if device_index is None else device_index
            return NvmlGpuHealth(idx)
    except Exception:  # noqa: BLE001 - no driver / no library: fall back to the fake
        pass
    return FakeNvmlGpuHealth()
