"""The denoiser step without host synchronisation: what the sampling loop does per step must never wait for the GPU.

A host sync (``.item()``, ``bool(t)``, ``float(t)``, a blocking copy from pageable host memory) stalls the CPU until
the GPU drains its queue, so the next step's launches cannot be queued ahead, and it makes the step impossible to
capture in a CUDA graph. The pieces here replace the three the sampling step had:

- the model timestep: computed on the host (IEEE fp32, as diffusers computes it on the device) and written into a
  device tensor by a fill kernel (``torch.full`` passes the value as a kernel argument: no copy, no sync), instead of
  ``tensor.to(device)`` from pageable memory (a blocking copy);
- the CFG-normalization clamp: ``torch.where`` on the device instead of ``if pred_norm > max_norm`` (a sync per
  sample per step);
- the ragged batch's ``kv_lens``: one device tensor per distinct length tuple, made once and reused (see
  ``kv_lens_tensor``), instead of a ``torch.tensor(lens, device=...)`` copy per forward.

``count_host_syncs`` is the probe the CPU tests use: run on the ``meta`` device (standing in for the GPU), any host
read of a device tensor raises there, and any host-to-device copy is counted.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Sequence

import torch
from torch.overrides import TorchFunctionMode


def device_timestep(t_host: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[batch]`` tensor on ``device`` holding the host fp32 scalar ``t_host`` (bit-exact), without a copy."""
    return torch.full((batch,), float(t_host), dtype=torch.float32, device=device)


def cfg_combine(pos: torch.Tensor, neg: torch.Tensor, guidance: float, cfg_normalization: float) -> torch.Tensor:
    """``pos + g·(pos − neg)``, and with ``cfg_normalization > 0`` rescaled so that its L2 norm is at most
    ``cfg_normalization·‖pos‖`` (one sample; fp32). The clamp is a ``torch.where`` on the device, not a host ``if``:
    the factor is exactly 1 when the norm is within bounds, so the result equals the branching version bit for bit."""
    pred = pos + guidance * (pos - neg)
    if cfg_normalization > 0:
        pos_norm, pred_norm = torch.linalg.vector_norm(pos), torch.linalg.vector_norm(pred)
        max_norm = pos_norm * cfg_normalization
        pred = pred * torch.where(pred_norm > max_norm, max_norm / pred_norm, torch.ones_like(pred_norm))
    return pred


_KV_LENS: dict = {}
_KV_LENS_LOCK = threading.Lock()


def kv_lens_tensor(lens: Sequence[int], device: torch.device) -> torch.Tensor:
    """int32 ``[B]`` device tensor of ``lens``, made once per (lengths, device) and reused (read-only by contract:
    the kernels and the reference only read it). Caption lengths come from a few buckets, so the table stays small;
    it is bounded anyway."""
    key = (tuple(int(n) for n in lens), str(device))
    t = _KV_LENS.get(key)
    if t is None:
        with _KV_LENS_LOCK:
            if len(_KV_LENS) > 256:
                _KV_LENS.clear()
            t = _KV_LENS.setdefault(key, torch.tensor(key[0], dtype=torch.int32, device=device))
    return t


class HostSyncCounter(TorchFunctionMode):
    """Counts host reads of device tensors and host-to-device copies while active.

    ``device``: the device standing in for the accelerator (``meta`` in CPU tests, where a host read of a device
    tensor cannot return a value). Counted: ``.item()``, ``bool()``/``float()``/``int()``, ``.tolist()``,
    ``.numpy()``, ``.cpu()`` and device-to-host ``.to()`` of a device tensor; ``.to()``/``copy_`` of a host tensor
    onto the device; ``torch.tensor``/``as_tensor`` with data built on the host for the device.
    """

    READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = torch.device(device)
        self.events: list[str] = []

    @staticmethod
    def _where() -> str:
        """file:line of the innermost frame in this repository's code (the caller that caused the event)."""
        for fr in reversed(traceback.extract_stack()[:-3]):
            if ("zimage_core" in fr.filename or "kernels" in fr.filename) and not fr.filename.endswith("nosync.py"):
                return f"{fr.filename.rsplit('/', 2)[-2]}/{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno}"
        return "?"

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device.type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS and args and self._on_device(args[0]):
            self.events.append(f"{name} of a device tensor at {self._where()}")
        elif name == "to" and args and isinstance(args[0], torch.Tensor):
            dst = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            if dst is not None:
                src_dev, dst_dev = args[0].device.type, torch.device(dst).type
                if src_dev != dst_dev and self.device.type in (src_dev, dst_dev):
                    self.events.append(f"to(): {src_dev} -> {dst_dev} copy at {self._where()}")
        elif name == "copy_" and len(args) > 1 and self._on_device(args[0]) and not self._on_device(args[1]):
            self.events.append(f"copy_: host -> device at {self._where()}")
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None and not self._on_device(args[0]):
            if torch.device(kwargs["device"]).type == self.device.type:
                self.events.append(f"torch.{name}(host data, device=...) at {self._where()}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs(device: str = "meta"):
    """``with count_host_syncs() as c: ...``; then ``c.events`` lists every host sync / host-to-device copy."""
    counter = HostSyncCounter(device)
    with counter:
        yield counter
