"""Device telemetry sampled in a background thread while a configuration runs.

- :class:`GpuTelemetry` (NVML through ``nvidia-ml-py``): power, temperature, SM and memory clocks, memory used and
  utilisation, sampled every ``interval_s``; energy from the board's energy counter (Volta and newer), else the
  integral of the sampled power. Absent NVML (a CPU machine, no driver) it records nothing and says why.
- :class:`RssTelemetry` (CPU runs): the process's resident set size, sampled the same way (process-wide: it
  includes every loaded model, so it is a ceiling, not a per-configuration figure).

Use either as a context manager around the timed region, or ``start()``/``stop()``; ``stop()`` returns a summary dict
and the object can be started again (summaries of several windows combine with :func:`merge`).
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch


def _nvml():
    """The ``pynvml`` module, initialised, or raise with a reason."""
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    return pynvml


def _handle(nv, cuda_index: int):
    """The NVML handle of CUDA device ``cuda_index`` (by UUID, so CUDA_VISIBLE_DEVICES remapping is respected)."""
    try:
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
    except Exception:  # older torch without .uuid, or MIG: fall back to the index
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if ids and all(v.isdigit() for v in ids) and cuda_index < len(ids):
            return nv.nvmlDeviceGetHandleByIndex(int(ids[cuda_index]))
        return nv.nvmlDeviceGetHandleByIndex(cuda_index)


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def nvml_static_info(cuda_index: int = 0) -> dict:
    """Driver version, NVML's name for the board, power limit and max clocks; {} (with a reason) without NVML."""
    try:
        nv = _nvml()
    except Exception as e:  # noqa: BLE001 - any failure means "no NVML here"
        return {"nvml": f"unavailable: {type(e).__name__}: {e}"}
    info = {"driver": _str(nv.nvmlSystemGetDriverVersion())}
    try:
        v = nv.nvmlSystemGetCudaDriverVersion_v2()
        info["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:  # noqa: BLE001
        pass
    try:
        h = _handle(nv, cuda_index)
        info["nvml_name"] = _str(nv.nvmlDeviceGetName(h))
        info["power_limit_w"] = nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000
        info["max_sm_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)
        info["max_mem_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)
    except Exception as e:  # noqa: BLE001
        info["nvml_device"] = f"unavailable: {type(e).__name__}: {e}"
    return info


class _Sampler:
    """A daemon thread calling ``self._sample()`` every ``interval_s`` between start() and stop()."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval_s)

    def start(self):
        self.samples = []
        self._stop.clear()
        self._begin()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=type(self).__name__)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(self._sample())  # at least one sample, taken at the end of the window
        return self._summary()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.summary = self.stop()

    def _begin(self):
        pass

    def _sample(self) -> dict:
        raise NotImplementedError

    def _summary(self) -> dict:
        raise NotImplementedError


class GpuTelemetry(_Sampler):
    """NVML sampler for one CUDA device. ``available`` is False (and ``reason`` says why) where NVML is missing."""

    def __init__(self, cuda_index: int = 0, interval_s: float = 0.05):
        super().__init__(interval_s)
        self.available, self.reason = False, None
        try:
            self._nv = _nvml()
            self._h = _handle(self._nv, cuda_index)
            self.available = True
        except Exception as e:  # noqa: BLE001
            self.reason = f"NVML unavailable: {type(e).__name__}: {e}"

    def _energy_mj(self):
        try:
            return self._nv.nvmlDeviceGetTotalEnergyConsumption(self._h)  # mJ since driver load (Volta+)
        except Exception:  # noqa: BLE001
            return None

    def _begin(self):
        self._t0 = time.perf_counter()
        self._e0 = self._energy_mj() if self.available else None

    def _sample(self) -> dict:
        if not self.available:
            return {}
        nv, h = self._nv, self._h
        s = {"t": time.perf_counter()}
        for key, fn in (
            ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000),
            ("temp_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            ("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            ("mem_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            ("mem_used_gb", lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 2**30),
            ("util_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
        ):
            try:
                s[key] = fn()
            except Exception:  # noqa: BLE001 - a board may not report one of these
                pass
        return s

    def _summary(self) -> dict:
        if not self.available:
            return {"telemetry": self.reason}
        dur = time.perf_counter() - self._t0
        out = {"samples": len(self.samples), "window_s": dur}
        for key in ("power_w", "temp_c", "sm_clock_mhz", "mem_clock_mhz", "mem_used_gb", "util_pct"):
            vals = [s[key] for s in self.samples if key in s]
            if vals:
                out[f"{key}_median"] = statistics.median(vals)
                out[f"{key}_min"] = min(vals)
                out[f"{key}_max"] = max(vals)
        e1 = self._energy_mj()
        if self._e0 is not None and e1 is not None:
            out["energy_j"], out["energy_source"] = (e1 - self._e0) / 1000, "counter"
        else:
            pts = [(s["t"], s["power_w"]) for s in self.samples if "power_w" in s]
            if len(pts) >= 2:
                area = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(pts, pts[1:]))
                out["energy_j"], out["energy_source"] = area, "integrated power samples"
        return out


class RssTelemetry(_Sampler):
    """Peak resident set size of this process over the window (Linux ``/proc/self/statm``)."""

    available = True
    reason = None

    def __init__(self, interval_s: float = 0.01):
        super().__init__(interval_s)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _sample(self) -> dict:
        try:
            with open("/proc/self/statm") as f:
                return {"rss_mb": int(f.read().split()[1]) * self._page / 2**20}
        except OSError:
            return {}

    def _summary(self) -> dict:
        vals = [s["rss_mb"] for s in self.samples if "rss_mb" in s]
        return {"samples": len(self.samples), "rss_mb_max": max(vals)} if vals else {}


def for_device(device: torch.device):
    """The sampler that fits ``device``: NVML on CUDA, process RSS on CPU."""
    if device.type == "cuda":
        return GpuTelemetry(device.index if device.index is not None else torch.cuda.current_device())
    return RssTelemetry()


def merge(summaries: list[dict]) -> dict:
    """Combine the summaries of several windows: energy and sample counts add; medians are medians of medians;
    max/min take the extreme."""
    summaries = [s for s in summaries if s]
    if not summaries:
        return {}
    out: dict = {}
    keys = {k for s in summaries for k in s}
    for k in sorted(keys):
        vals = [s[k] for s in summaries if k in s]
        if k in ("samples", "window_s", "energy_j"):
            out[k] = sum(vals)
        elif k.endswith("_max"):
            out[k] = max(vals)
        elif k.endswith("_min"):
            out[k] = min(vals)
        elif k.endswith("_median"):
            out[k] = statistics.median(vals)
        else:
            out[k] = vals[-1]
    return out
