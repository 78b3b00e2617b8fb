"""GPU health: a Protocol with an NVML implementation and a fake one for CPU-only hosts.

The fake's Xid/ECC counters move only when a fault is injected (the gpu_xid fault),
so the supervisor's GPU-fault path can be exercised without hardware.

What the NVML implementation counts (the decisions are the pure functions below, tested
on CPU with fakes; the NVML calls themselves have never run here — no GPU in CI):

- which GPU: the one this process's CUDA device is, looked up by UUID
  (`torch.cuda.get_device_properties(i).uuid`). NVML ignores CUDA_VISIBLE_DEVICES, so
  the CUDA ordinal (0 in every 1-GPU Ray actor) names some other GPU in NVML's numbering.
- Xid: only the hardware/driver Xids in `HARDWARE_XIDS` (the event's `eventData` is the
  Xid); application Xids (13, 31, 43, ...) are the program's own faults, not the GPU's.
  NVML_ERROR_TIMEOUT from the event wait means "no event"; any other NVML error there
  (GPU lost, driver gone) counts as one fault, once.
- ECC: the volatile uncorrected count runs from driver load, so it is exported as the
  increase since this process started (`EccBaseline`): an error from before the worker
  started must not fire the alert at its first scrape.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

__all__ = ["GpuSample", "GpuHealth", "NvmlGpuHealth", "FakeNvmlGpuHealth", "make_gpu_health",
           "HARDWARE_XIDS", "is_hardware_xid", "drain_xid_events", "EccBaseline", "nvml_uuid",
           "nvml_handle_for"]

# Xids that mean the GPU, its memory, its links or its driver/firmware failed — the node
# needs attention — after NVIDIA's Xid catalog (docs.nvidia.com/deploy/xid-errors) and its
# page retirement / row remapping notes. Everything else (13 graphics engine exception,
# 31 MMU fault, 43 channel reset, 45 preemptive cleanup, 68 video processor exception, 109
# context switch timeout, ...) is raised by what a program did and is not counted.
HARDWARE_XIDS: frozenset[int] = frozenset({
    48,   # double-bit ECC error (DBE)
    61,   # internal micro-controller breakpoint/warning
    62,   # internal micro-controller halt
    63,   # ECC page retirement / row remapping recorded (reset to activate)
    64,   # ECC page retirement / row remapping failure
    74,   # NVLink error
    79,   # GPU has fallen off the bus
    92,   # high single-bit ECC error rate
    94,   # contained ECC error
    95,   # uncontained ECC error
    119,  # GSP RPC timeout
    120,  # GSP error
})

# NVML return codes (nvml.h; the same values as pynvml's NVML_ERROR_*), for the pure
# functions that must not import pynvml
NVML_ERROR_TIMEOUT = 10
MAX_EVENTS_PER_SAMPLE = 1024  # a storm of events must not hold a scrape forever


@dataclass(frozen=True)
class GpuSample:
    utilization_ratio: float  # 0..1
    memory_used_bytes: int
    xid_errors: int  # cumulative (hardware Xids, plus one if the GPU was lost)
    ecc_errors: int  # cumulative since this process started (uncorrected, volatile)


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


# -- the decisions, pure ------------------------------------------------------------------
def is_hardware_xid(xid: int) -> bool:
    return int(xid) in HARDWARE_XIDS


def drain_xid_events(wait: Callable[[], Any], *, timeout_code: int = NVML_ERROR_TIMEOUT,
                     limit: int = MAX_EVENTS_PER_SAMPLE) -> tuple[int, bool]:
    """Read pending Xid events with `wait()` (nvmlEventSetWait_v2 with a 0 ms timeout) until
    it times out. Returns (hardware Xids seen, lost): `lost` when `wait` raised anything but
    the timeout — the GPU or the driver is gone, which is a fault in itself."""
    hardware = 0
    for _ in range(limit):
        try:
            event = wait()
        except Exception as e:  # noqa: BLE001 - pynvml raises NVMLError subclasses with .value
            if getattr(e, "value", None) == timeout_code:
                return hardware, False
            return hardware, True
        if is_hardware_xid(int(event.eventData)):
            hardware += 1
    return hardware, False


class EccBaseline:
    """The uncorrected volatile ECC count as an increase since this process started: the
    first successful read is the baseline. A read that fails (ECC off or unsupported)
    counts as no new errors."""

    def __init__(self) -> None:
        self.baseline: int | None = None
        self.last = 0

    def update(self, raw: int | None) -> int:
        if raw is None:
            return self.last
        if self.baseline is None:
            self.baseline = int(raw)
        # the volatile count resets only with the driver; never let the counter go back
        self.last = max(self.last, int(raw) - self.baseline)
        return self.last


def nvml_uuid(cuda_uuid: Any) -> str:
    """NVML's spelling of a CUDA device UUID: torch prints it without NVML's "GPU-" prefix."""
    s = str(cuda_uuid).strip()
    return s if s.startswith(("GPU-", "MIG-")) else f"GPU-{s}"


def nvml_handle_for(nvml: Any, *, uuid: Any | None, nvml_index: Callable[[], int] | None) -> Any:
    """The NVML handle of this process's GPU: by UUID, else by the NVML index torch derives
    from CUDA_VISIBLE_DEVICES (`torch.cuda._get_nvml_device_index`). Never the CUDA ordinal."""
    errors: list[str] = []
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(nvml_uuid(uuid))
        except Exception as e:  # noqa: BLE001 - e.g. a MIG instance: try the index
            errors.append(f"by UUID {nvml_uuid(uuid)}: {e}")
    if nvml_index is not None:
        try:
            return nvml.nvmlDeviceGetHandleByIndex(nvml_index())
        except Exception as e:  # noqa: BLE001
            errors.append(f"by NVML index: {e}")
    raise RuntimeError("cannot find this process's GPU in NVML (" + "; ".join(errors or ["no UUID, no index"]) + ")")


# -- NVML ---------------------------------------------------------------------------------
class NvmlGpuHealth:
    """Real NVML (nvidia-ml-py) for one CUDA device of this process. Xid events are read
    from the event set when the driver supports it; injected Xids (fault tests on real GPUs)
    add on top."""

    name = "nvml"

    def __init__(self, device: Any = 0) -> None:
        import pynvml  # nvidia-ml-py
        import torch

        self._nvml = pynvml
        pynvml.nvmlInit()
        index = device.index if hasattr(device, "index") else int(device)
        index = 0 if index is None else index
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        get_index = getattr(torch.cuda, "_get_nvml_device_index", None)
        self._handle = nvml_handle_for(pynvml, uuid=uuid,
                                       nvml_index=(lambda: get_index(index)) if get_index is not None else None)
        self._lock = threading.Lock()
        self._injected_xid = 0
        self._xid = 0
        self._lost = False
        self._ecc = EccBaseline()
        self._ecc.update(self._read_ecc())  # the baseline: errors from before this worker started
        self._events = None
        try:
            es = pynvml.nvmlEventSetCreate()
            pynvml.nvmlDeviceRegisterEvents(self._handle, pynvml.nvmlEventTypeXidCriticalError, es)
            self._events = es
        except Exception:  # noqa: BLE001 - not supported on every driver / in containers
            self._events = None

    def _read_ecc(self) -> int | None:
        n = self._nvml
        try:
            return int(n.nvmlDeviceGetTotalEccErrors(
                self._handle, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC))
        except Exception:  # noqa: BLE001 - ECC off or unsupported
            return None

    def _drain_xid(self) -> None:
        if self._events is None or self._lost:
            return
        events = self._events
        hardware, lost = drain_xid_events(lambda: self._nvml.nvmlEventSetWait_v2(events, 0),
                                          timeout_code=self._nvml.NVML_ERROR_TIMEOUT)
        self._xid += hardware
        if lost:
            self._lost = True  # counted once; the event set is not read again
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
            ecc = self._ecc.update(self._read_ecc())
            return GpuSample(util, mem, self._xid + self._injected_xid, ecc)

    def inject_xid(self, n: int = 1) -> None:
        with self._lock:
            self._injected_xid += n


def make_gpu_health(device: Any = None) -> GpuHealth:
    """NVML for `device` (a torch.device or CUDA ordinal of this process) when it is a CUDA
    device and NVML initialises; the fake otherwise — also when no device is given: a
    process that was not given a GPU does not watch one it merely sees."""
    try:
        import torch

        if device is None:
            return FakeNvmlGpuHealth()
        dev = device if isinstance(device, torch.device) else torch.device("cuda", int(device))
        if dev.type == "cuda" and torch.cuda.is_available():
            return NvmlGpuHealth(dev)
    except Exception:  # noqa: BLE001 - no driver / no library: fall back to the fake
        pass
    return FakeNvmlGpuHealth()
