"""GPU health through NVML (pynvml, from nvidia-ml-py) on a background thread.

The thread samples every GPU of this node every `interval_s` and keeps the latest sample; the
training loop picks it up at its next logged step and writes one 'gpu' event (no NVML call ever
runs on the training thread, and pynvml's ctypes calls release the GIL). Without NVML (no
library, no driver: a CPU machine) start() logs one line and nothing else happens.

Per GPU: NVML index, utilization %, memory used/total GB, power W, temperature C, SM clock MHz,
the active clock throttle reasons by name, and the volatile uncorrected ECC error count. A
field the GPU does not support is None.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

# NVML clock-event ("throttle") reason bits -> names (nvml.h nvmlClocksEventReason*).
THROTTLE_REASONS = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS if mask & bit]


def _get(fn, *args) -> Any:
    """An NVML query, or None where the GPU does not support it (NVMLError_NotSupported, ...)."""
    try:
        return fn(*args)
    except Exception:
        return None


def sample(nvml, handles: list) -> list[dict]:
    """One record per GPU handle (see the module docstring)."""
    out = []
    for index, h in enumerate(handles):
        util = _get(nvml.nvmlDeviceGetUtilizationRates, h)
        mem = _get(nvml.nvmlDeviceGetMemoryInfo, h)
        power_mw = _get(nvml.nvmlDeviceGetPowerUsage, h)
        reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = _get(reasons_fn, h)
        out.append({
            "index": index,
            "util_pct": None if util is None else util.gpu,
            "mem_used_gb": None if mem is None else mem.used / 1e9,
            "mem_total_gb": None if mem is None else mem.total / 1e9,
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "temp_c": _get(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU),
            "sm_clock_mhz": _get(nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM),
            "throttle_reasons": None if mask is None else throttle_names(mask),
            "ecc_uncorrected": _get(nvml.nvmlDeviceGetTotalEccErrors, h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                    nvml.NVML_VOLATILE_ECC),
        })
    return out


class GpuStats:
    """Samples this node's GPUs every interval_s on a daemon thread; `take()` returns the newest
    sample not taken yet. `nvml` is the pynvml module (tests pass a stand-in)."""

    def __init__(self, interval_s: float = 30.0, nvml=None) -> None:
        self.interval_s = interval_s
        self._nvml = nvml
        self._handles: list = []
        self._latest: Optional[tuple[float, list[dict]]] = None
        self._taken_at = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> bool:
        """Initialise NVML and start sampling; False (one log line) when NVML is unavailable."""
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i)
                             for i in range(self._nvml.nvmlDeviceGetCount())]
        except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded, or no pynvml at all
            log.info("GPU stats off: NVML unavailable (%s: %s)", type(e).__name__, e)
            self._nvml = None
            return False
        if not self._handles:
            log.info("GPU stats off: NVML sees no GPU")
            return False
        self._thread = threading.Thread(target=self._run, name="megatron-tts-gpu-stats", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                self._latest = (time.time(), sample(self._nvml, self._handles))
                failures = 0
            except Exception as e:  # never let a sampling error end the thread silently
                failures += 1
                if failures == 1:
                    log.warning("GPU stats: sampling failed (%s: %s); retrying every %g s", type(e).__name__, e,
                                self.interval_s)
            if self._stop.wait(self.interval_s):
                return

    def take(self) -> Optional[list[dict]]:
        latest = self._latest
        if latest is None or latest[0] <= self._taken_at:
            return None
        self._taken_at = latest[0]
        return latest[1]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
