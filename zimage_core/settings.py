"""Every ``ZIMAGE_*`` environment variable the project reads: its name, default and meaning, in one list.

The reading sites stay where they are (``zimage_kernels`` imports nothing of ``zimage_core``, so its variables are
declared here and read there); ``tests/test_settings.py`` fails when any code of the repository (the packages,
``scripts/``, ``tests/``) names a ``ZIMAGE_*`` variable that is not declared here, and when ``docs/settings.md``
differs from what this module generates:

    python -m zimage_core.settings --write docs/settings.md    # regenerate the page
    python -m zimage_core.settings --check docs/settings.md    # exit 1 if it is stale

To add a variable: add a :class:`Setting` below (in its group), read it where it is used, regenerate the page.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None  # what an unset variable means, as text; None: unset has its own meaning (see ``meaning``)
    meaning: str
    read_by: str  # the file(s) that read it


GROUPS = ("library", "kernels", "server", "parallel", "bench and scripts", "tests")

SETTINGS: dict[str, tuple[Setting, ...]] = {
    "library": (
        Setting(
            "ZIMAGE_CACHE",
            "$XDG_CACHE_HOME/zimage-fast (~/.cache/zimage-fast)",
            "Cache folder: the random-weight fallback pipeline and, below it, `outputs/`.",
            "zimage_core/default_model.py",
        ),
        Setting(
            "ZIMAGE_OUTPUT_DIR",
            "<cache>/outputs",
            "Folder of the local image store behind `outputType: URL` (also `zimage serve --output-dir`).",
            "zimage_core/service/outputs.py, zimage_core/cli.py",
        ),
        Setting(
            "ZIMAGE_PRICE_PER_DEVICE_HOUR",
            None,
            "USD per device hour for `includeCost` when `ServerConfig.price_per_device_hour` is not set; unset: "
            "responses carry no cost field (with a warning saying why).",
            "zimage_core/service/infer.py",
        ),
        Setting(
            "ZIMAGE_COMPILE",
            "on with CUDA, off on CPU",
            "`0`, `false`, `no` or `off`: no regional `torch.compile` by default (`ZImage.optimize()`, "
            "`zimage generate`); `--compile` still turns it on.",
            "zimage_core/compile.py, zimage_core/cli.py",
        ),
    ),
    "kernels": (
        Setting(
            "ZIMAGE_KERNELS",
            "auto",
            "Op backend when none is passed: `auto` (Triton on CUDA, torch elsewhere), `torch` or `triton`.",
            "zimage_kernels/backend.py",
        ),
        Setting(
            "ZIMAGE_FP8_GEMM",
            "auto",
            'Which FP8 GEMM the e4m3 layers run (`quantize="fp8"`): `auto` (`torch._scaled_mm` where it runs, else the '
            "Triton FP8 GEMM), `scaled_mm`, `triton` or `dequant` (ablations, tests).",
            "zimage_kernels/fp8.py",
        ),
        Setting(
            "ZIMAGE_ATTENTION_PATH",
            "auto",
            "Attention kernel path: `auto` (TMA + warp specialization where available), `tma` or `plain` (ablations).",
            "zimage_kernels/attention.py",
        ),
        Setting(
            "ZIMAGE_ATTENTION_IMPL",
            "default",
            "`fa3`: the opt-in FA3-structured Gluon attention kernel for eager calls on sm_90; `default`: the "
            "default kernels.",
            "zimage_kernels/attention.py",
        ),
        Setting(
            "ZIMAGE_AUTOTUNE",
            "curated",
            "`full`: autotune over the whole config space on a GPU; anything else: the curated short list.",
            "zimage_kernels/_triton.py",
        ),
    ),
    "server": (
        Setting(
            "ZIMAGE_HOST",
            "127.0.0.1",
            "`zimage serve --host`: bind address (non-loopback needs keys).",
            "zimage_core/cli.py",
        ),
        Setting("ZIMAGE_PORT", "8000", "`zimage serve --port`.", "zimage_core/cli.py"),
        Setting(
            "ZIMAGE_STATE_DIR",
            "$XDG_STATE_HOME/zimage (~/.local/state/zimage)",
            "State folder of `zimage serve`: async results are kept in `<state>/results/<port>` so that `getResponse` "
            "answers after a restart (`--results-dir` overrides, `--no-durable-results` turns it off).",
            "zimage_core/server/durable.py",
        ),
        Setting(
            "ZIMAGE_API_KEYS",
            None,
            "Comma-separated API keys, added to those of `--api-keys`; with no key at all any key is accepted and "
            "the server binds loopback only.",
            "zimage_core/cli.py",
        ),
        Setting(
            "ZIMAGE_API_KEYS_FILE", None, "`zimage serve --api-keys FILE`: one API key per line.", "zimage_core/cli.py"
        ),
        Setting("ZIMAGE_QUEUE", "16", "`zimage serve --queue`: tasks waiting for the model.", "zimage_core/cli.py"),
        Setting(
            "ZIMAGE_TASK_TIMEOUT",
            "300",
            "`zimage serve --task-timeout`: seconds per task, queue wait plus run.",
            "zimage_core/cli.py",
        ),
        Setting(
            "ZIMAGE_PUBLIC_URL",
            "http://HOST:PORT",
            "`zimage serve --public-url`: the base of `imageURL`.",
            "zimage_core/cli.py",
        ),
        Setting(
            "ZIMAGE_ALLOW_OUTBOUND",
            "off",
            "`1`: `zimage serve --allow-outbound` (webhooks and uploads, under the outbound-call policy).",
            "zimage_core/cli.py",
        ),
        Setting(
            "ZIMAGE_LOG_LEVEL",
            "info",
            "uvicorn's log level for `zimage serve`.",
            "zimage_core/server/app.py",
        ),
        Setting(
            "ZIMAGE_RAY_LOG",
            None,
            "Any non-empty value: Ray forwards its workers' logs to the driver (`zimage serve --ray`); unset: not.",
            "zimage_core/server/ray_app.py",
        ),
    ),
    "parallel": (
        Setting(
            "ZIMAGE_PARALLEL_TIMEOUT",
            "300",
            "Seconds before a collective times out (a hang fails instead of waiting forever).",
            "zimage_core/parallel/mesh.py",
        ),
        Setting(
            "ZIMAGE_PARALLEL_RUN_TIMEOUT",
            "3600",
            "Seconds for a whole `zimage generate --parallel` run whose ranks the command spawns.",
            "zimage_core/cli.py",
        ),
        Setting(
            "ZIMAGE_PARALLEL_START",
            "spawn",
            "How `zimage generate --parallel` starts its ranks: `spawn` or `fork`.",
            "zimage_core/cli.py",
        ),
    ),
    "bench and scripts": (
        Setting(
            "ZIMAGE_VENV",
            ".venv",
            "The virtual environment `scripts/bootstrap.sh` creates and `scripts/test.sh` uses.",
            "scripts/bootstrap.sh, scripts/test.sh",
        ),
        Setting(
            "ZIMAGE_SKIP_BROWSER",
            None,
            "`1`: `scripts/test.sh` does not install Chromium; the browser test then skips and says why.",
            "scripts/test.sh",
        ),
        Setting(
            "ZIMAGE_SKIP_RAY",
            None,
            "`1`: `scripts/test.sh` does not install the `[ray]` extra; the Ray test then skips and says why.",
            "scripts/test.sh",
        ),
        Setting(
            "ZIMAGE_GIT_SHA",
            "git rev-parse HEAD",
            "The commit `scripts/gpu_check.sh` records in `env.json` where `git` is missing.",
            "scripts/gpu_check.py",
        ),
    ),
    "tests": (
        Setting(
            "ZIMAGE_REQUIRE_BROWSER",
            None,
            "`1` (set by `scripts/test.sh` after installing Chromium): the browser test fails instead of skipping.",
            "tests/test_serve_ops.py",
        ),
        Setting(
            "ZIMAGE_REQUIRE_RAY",
            None,
            "`1` (set by `scripts/test.sh` after installing `[ray]`): the Ray Serve test fails instead of skipping.",
            "tests/test_ray_serve.py",
        ),
        Setting(
            "ZIMAGE_RUNWARE_SDK_PYTHON",
            "build/runware-sdk-venv",
            "An interpreter that has `runware-sdk` installed; unset: the test makes its own venv.",
            "tests/test_server_sdk.py",
        ),
        Setting(
            "ZIMAGE_FUZZ_REQUESTS",
            "2000",
            "Requests of the fuzz campaign in the `cpu` tier (the `fuzz` tier runs 20,000).",
            "tests/test_fuzz.py",
        ),
        Setting(
            "ZIMAGE_FUZZ_IMAGES",
            "600",
            "Corrupted images of the fuzz campaign in the `cpu` tier (the `fuzz` tier runs 6,000).",
            "tests/test_fuzz.py",
        ),
        Setting(
            "ZIMAGE_BENCH_MODEL",
            "default on CPU, synthetic on CUDA",
            "The model of the pytest-benchmark cases (as `--model`).",
            "tests/benchmarks/test_pipeline_cases.py",
        ),
        Setting(
            "ZIMAGE_BENCH_SHAPES",
            "cpu / gpu",
            "The shape table of the pytest-benchmark cases (a table name or specs, as `--shapes`).",
            "tests/benchmarks/test_pipeline_cases.py",
        ),
    ),
}

BY_NAME: dict[str, Setting] = {s.name: s for group in SETTINGS.values() for s in group}


def get(name: str) -> str | None:
    """The variable's value, or ``None`` when unset; a ``KeyError`` for a name not declared here."""
    if name not in BY_NAME:
        raise KeyError(f"{name} is not a declared setting (zimage_core/settings.py lists them)")
    return os.environ.get(name)


def markdown() -> str:
    lines = [
        "# Settings: environment variables",
        "",
        "Generated from `zimage_core/settings.py` by `python -m zimage_core.settings --write docs/settings.md`; "
        "do not edit by hand (`tests/test_settings.py` fails when this page is stale, and when code reads a "
        "`ZIMAGE_*` variable that the module does not declare).",
        "",
        f"{len(BY_NAME)} variables. Command-line options, where there is one, win over the variable.",
    ]
    for group in GROUPS:
        lines += [
            "",
            f"## {group[0].upper()}{group[1:]}",
            "",
            "| variable | default | meaning | read by |",
            "|---|---|---|---|",
        ]
        for s in SETTINGS[group]:
            default = f"`{s.default}`" if s.default is not None else "unset"
            lines.append(f"| `{s.name}` | {default} | {s.meaning} | {s.read_by} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_core.settings", description="Print or write docs/settings.md")
    ap.add_argument("--write", metavar="PATH", type=Path, help="write the page to PATH")
    ap.add_argument("--check", metavar="PATH", type=Path, help="exit 1 if PATH differs from the generated page")
    args = ap.parse_args(argv)
    text = markdown()
    if args.check:
        current = args.check.read_text(encoding="utf-8") if args.check.is_file() else None
        if current != text:
            print(f"{args.check} is stale: run python -m zimage_core.settings --write {args.check}", file=sys.stderr)
            return 1
        return 0
    if args.write:
        args.write.write_text(text, encoding="utf-8")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
