"""The environment a benchmark row was measured in: versions, device, driver, git revision.

Every row carries this dict (``row["env"]``), so a row read on its own says where it came from.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "diffusers", "transformers", "numpy", "nvidia-ml-py")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip()


@functools.lru_cache(maxsize=1)
def git_info() -> dict:
    """{"git_sha": full sha or None, "git_dirty": tracked files modified (untracked ignored), "git_branch"}."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status), "git_branch": branch}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info(device: torch.device) -> dict:
    """Name, compute capability, memory and (through NVML, when present) the driver version of a CUDA device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info = {
        "gpu": props.name,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "gpu_sm_count": props.multi_processor_count,
    }
    from .telemetry import nvml_static_info

    info.update(nvml_static_info(index))
    return info


def environment(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    env = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **{name.replace("-", "_"): package_version(name) for name in PACKAGES},
        **git_info(),
    }
    env.update(gpu_info(device))
    return env


def device_label(env: dict) -> str:
    """A short name for tables and file names: the GPU name, else "CPU (<model>, N threads)"."""
    if env.get("gpu"):
        return env["gpu"]
    return f"CPU ({env.get('cpu')}, {env.get('torch_threads')} threads)"
