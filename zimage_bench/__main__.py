"""``python -m zimage_bench <command> [options]``: the benchmark harness.

Each command lives in its own module ``zimage_bench/<command>.py`` exposing ``main(argv: list[str]) -> int``.
"""

import importlib
import sys

COMMANDS = {
    "kernels": "per-op Triton kernel microbenchmarks against torch SDPA and the eager references",
    "parity": "our pipeline against diffusers' ZImagePipeline: per-step and final latent error, image PSNR",
    "throughput": "ms per forward / step / image against diffusers, eager and compiled, with telemetry",
    "cache": "step-cache threshold sweeps: evaluations saved, speedup, PSNR/SSIM, Pareto plot",
    "calibrate": "TeaCache calibration: fit the model's rescaling polynomial and store it in the coefficient table",
    "ablate": "each optimisation (compile, Triton kernels, TMA attention) on and off, side by side in one run",
    "parallel": "sequence/CFG parallelism: ms per step and communication per mode, next to an NVLink model",
    "serve": "N concurrent protocol clients against one server process and Ray replicas; overhead vs direct infer",
    "fp8": "e4m3 W8A8: per-layer-group sensitivity, recipe image PSNR + pixel checker, weight memory, LoRA paths",
    "dropin": "zimage_core.diffusers.ZImagePipeline against diffusers' ZImagePipeline (and its attention processor)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m zimage_bench <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    if name == "cache" and "--sweep" in argv[1:]:  # every method × calibrator × step mask, cache-dit side by side
        name = "cache_sweep"
    try:
        module = importlib.import_module(f"zimage_bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"zimage_bench.{name}":
            print(f"bench {argv[0]}: not implemented yet", file=sys.stderr)
            return 2
        raise
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
