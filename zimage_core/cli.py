"""``zimage``: the command line.

zimage generate "a large red circle in the top left on a blue background" -o out.png
zimage infer request.json            # prints the imageInference response JSON
zimage serve --port 8000             # the hosted API's WebSocket + REST protocol on /v1 (docs/serving.md)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .config import DTYPE_NAMES

OUTPUT_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MAX_REQUEST_BYTES = 256 * 2**20  # a request file (base64 images included)
MAX_JSON_DEPTH = 64  # an imageInference request nests at most 4 levels; deeper input is refused, not recursed into

DTYPES = {**DTYPE_NAMES, **{name: name for name in DTYPE_NAMES.values()}}  # fp32 or float32, ...


def _load(args):
    import torch

    from .pipeline import ZImage

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    q = {"quantize": args.quantize} if getattr(args, "quantize", None) else {}
    if args.model:
        return ZImage.from_pretrained(args.model, device=args.device, dtype=dtype, kernel_backend=args.kernels, **q)
    return ZImage.default(device=args.device, dtype=dtype, kernel_backend=args.kernels, **q)


def _outpaint(text):
    vals = [int(v) for v in text.split(",")]
    if len(vals) != 4:
        raise argparse.ArgumentTypeError("--outpaint takes top,bottom,left,right")
    return dict(zip(("top", "bottom", "left", "right"), vals))


def _threshold(text):
    """--cache-threshold: a finite number in [0, 1] (the range of the request's cache thresholds)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text[:40]!r}") from None
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text[:40]!r}")
    return v


def _bounded(opt):
    """argparse type for a cache registry option: its kind and range, the flag named in the message."""

    def parse(text):
        try:
            v = float(text) if opt.kind == "float" else int(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or v < opt.lo or (opt.hi is not None and v > opt.hi):
            hi = f"{opt.hi:g}" if opt.hi is not None else "inf"
            raise argparse.ArgumentTypeError(
                f"must be {'a number' if opt.kind == 'float' else 'an integer'} in "
                f"[{opt.lo:g}, {hi}], got {text[:40]!r}"
            )
        return v

    return parse


def _add_cache_arguments(g) -> None:
    """--cache METHOD, each method's flags and --cache-preset, from the cache registry (zimage_core/cache)."""
    from zimage_core.cache import METHODS, PRESETS
    from zimage_core.cache.registry import cli_options

    g.add_argument("--cache", choices=list(METHODS), help="step cache")
    for flag, opt in cli_options().items():
        g.add_argument(flag, type=_threshold if flag == "--cache-threshold" else _bounded(opt), help=opt.help)
    g.add_argument("--cache-preset", choices=list(PRESETS), help="a named step-cache preset (instead of --cache)")


def _cache_config(pipe, args):
    """The step cache of a ``generate`` command line (``--cache`` with its flags, or ``--cache-preset``), or None."""
    from zimage_core.cache import METHODS, preset_config

    if args.cache_preset:
        if args.cache:
            raise SystemExit("zimage: error: give --cache or --cache-preset, not both")
        return preset_config(args.cache_preset, pipe=pipe, model_preset=args.preset_model)
    if not args.cache:
        return None
    from zimage_core.cache import CacheConfig

    kw = {}
    for o in METHODS[args.cache].options:
        v = getattr(args, o.cli.lstrip("-").replace("-", "_"), None) if o.cli else None
        if v is not None:
            kw[o.attr] = v
    return CacheConfig.for_method(args.cache, pipe=pipe, preset=args.preset_model, **kw)


def _json_depth_ok(text: str) -> bool:
    """Whether no JSON array/object nests deeper than MAX_JSON_DEPTH (brackets inside strings are skipped)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def read_request(source: str):
    """The request JSON of ``zimage infer`` (a file or - for stdin); every problem is a RequestError or OSError with
    a one-line message."""
    from .errors import RequestError

    if source == "-":
        data = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    else:
        path = Path(source)
        if not path.exists():
            raise RequestError("request", f"no such file: {source}")
        if not path.is_file():
            raise RequestError("request", f"not a regular file: {source}")
        if path.stat().st_size > MAX_REQUEST_BYTES:
            raise RequestError("request", f"file is larger than {MAX_REQUEST_BYTES // 2**20} MiB")
        data = path.read_bytes()
    if len(data) > MAX_REQUEST_BYTES:
        raise RequestError("request", f"is larger than {MAX_REQUEST_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("request", f"is not UTF-8 text (byte {e.start})") from None
    if not _json_depth_ok(text):
        raise RequestError("request", f"nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError("request", f"is not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        raise RequestError("request", f"is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None


def check_output_path(output: str) -> Path:
    """-o: a file (not a folder) with a known image extension in an existing folder; checked before the model loads."""
    from .errors import RequestError

    out = Path(output)
    if out.is_dir():
        raise RequestError("output", f"{output} is a folder; give a file name such as {out / 'out.png'}")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise RequestError("output", f"unknown image extension {out.suffix!r}; use one of {sorted(OUTPUT_SUFFIXES)}")
    if not out.parent.is_dir():
        raise RequestError("output", f"folder {out.parent} does not exist")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zimage", description="Z-Image text-to-image on zimage-fast")
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="diffusers-format Z-Image folder (default: the embedded small model)")
    common.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    common.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    common.add_argument("--kernels", choices=["auto", "torch", "triton"], help="op backend (default: auto)")
    common.add_argument("--quantize", choices=["none", "fp8"], help="fp8: e4m3 W8A8 main layers (docs/fp8.md)")
    common.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the transformer blocks (default: on with CUDA, off on CPU; ZIMAGE_COMPILE=0 turns it off)",
    )

    g = sub.add_parser("generate", parents=[common], help="generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png", help="output file; with several results: out-0.png, ...")
    g.add_argument("--negative-prompt")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--cfg-scale", type=float, help="standard CFG scale; guidance is off when <= 1")
    g.add_argument("--seed", type=int)
    g.add_argument("--scheduler", default="Default")
    g.add_argument("-n", "--number-results", type=int, default=1)
    g.add_argument("--strength", type=float)
    g.add_argument("--seed-image", help="image file for image-to-image / inpainting / outpainting")
    g.add_argument("--mask-image", help="mask file (white = repaint)")
    g.add_argument("--mask-margin", type=int)
    g.add_argument("--outpaint", type=_outpaint, metavar="TOP,BOTTOM,LEFT,RIGHT")
    g.add_argument("--cfg-normalization", type=float)
    g.add_argument("--cfg-truncation", type=float)
    g.add_argument("--shift", type=float)
    g.add_argument("--preset", dest="preset_model", help="model id whose defaults apply (e.g. z-image-turbo)")
    _add_cache_arguments(g)
    g.add_argument("--control-image", action="append", help="ControlNet guide image (repeat for several)")
    g.add_argument(
        "--control-model",
        action="append",
        help="ControlNet folder / .safetensors / id, one per --control-image (default: zimage:default-controlnet)",
    )
    g.add_argument("--control-weight", type=float, action="append", help="one value, or one per --control-image")
    g.add_argument("--control-mode", choices=["balanced", "controlnet", "prompt"], default="balanced")
    g.add_argument("--control-start", type=int, help="first step with the ControlNet (absolute)")
    g.add_argument("--control-end", type=int, help="step at which the ControlNet stops (exclusive)")
    g.add_argument(
        "--control-type", action="append", help="guide kind (canny, depth, pose, ..., gray, tile), one or one per image"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--parallel",
        metavar="SPEC",
        help="run on several processes/GPUs, e.g. ulysses=2,cfg=2 or ring=4 or ulysses=4,heads=pad "
        "(spawns the ranks; under torchrun, one rank per process)",
    )

    i = sub.add_parser("infer", parents=[common], help="run an imageInference request (JSON file or - for stdin)")
    i.add_argument("request")

    env = os.environ.get
    s = sub.add_parser("serve", parents=[common], help="serve the hosted API's WebSocket + REST protocol on /v1")
    s.add_argument("--host", default=env("ZIMAGE_HOST", "127.0.0.1"), help="bind address (non-loopback needs keys)")
    s.add_argument("--port", type=_serve_int("--port"), default=env("ZIMAGE_PORT", "8000"))
    s.add_argument("--api-keys", metavar="FILE", default=env("ZIMAGE_API_KEYS_FILE"), help="one API key per line")
    s.add_argument("--queue", type=_serve_int("--queue"), default=env("ZIMAGE_QUEUE", "16"), help="tasks waiting")
    s.add_argument("--task-timeout", type=_serve_float("--task-timeout"), default=env("ZIMAGE_TASK_TIMEOUT", "300"))
    s.add_argument("--idle-timeout", type=_serve_float("--idle-timeout"), default=60.0, help="close a silent WS (s)")
    s.add_argument("--public-url", default=env("ZIMAGE_PUBLIC_URL"), help="base of imageURL (default http://HOST:PORT)")
    s.add_argument("--output-dir", default=env("ZIMAGE_OUTPUT_DIR"), help="where URL outputs are kept")
    s.add_argument("--output-ttl", type=_serve_int("--output-ttl"), default=3600, help="s a URL output is kept")
    s.add_argument("--shutdown-grace", type=_serve_float("--shutdown-grace"), default=30.0, help="s on SIGTERM")
    s.add_argument(
        "--allow-outbound",
        action="store_true",
        default=env("ZIMAGE_ALLOW_OUTBOUND", "") == "1",
        help="allow webhookURL / uploadEndpoint (public addresses only, unless --outbound-allow-net)",
    )
    s.add_argument("--outbound-allow-net", action="append", default=[], metavar="CIDR", help="also allow this network")
    s.add_argument("--outbound-timeout", type=_serve_float("--outbound-timeout"), default=10.0, help="deadline (s)")
    s.add_argument("--lora-dir", metavar="DIR", help="LoRA store: lora[].model ID is DIR/ID.safetensors")
    s.add_argument(
        "--content-checker",
        metavar="MODULE:CALLABLE",
        help="callable(PIL image) -> True when NSFW; enables safety.checkContent / checkNSFW",
    )
    s.add_argument(
        "--face-detector",
        metavar="MODULE:CALLABLE",
        help="callable(PIL image) -> [(x0, y0, x1, y1, confidence)]; enables ultralytics",
    )
    s.add_argument("--results-dir", metavar="DIR", help="async results on disk ($ZIMAGE_STATE_DIR/results/PORT)")
    s.add_argument("--no-durable-results", action="store_true", help="keep async results in memory only")
    s.add_argument(
        "--results-items", type=_serve_int("--results-items"), default=1000, help="durable async results kept, at most"
    )
    s.add_argument(
        "--results-bytes",
        type=_serve_int("--results-bytes"),
        default=512 * 2**20,
        help="bytes of durable async results, at most",
    )
    s.add_argument("--ray", action="store_true", help="run as replicas on Ray Serve (needs the [ray] extra)")
    s.add_argument("--replicas", type=_serve_int("--replicas"), default=2, help="with --ray: replicas")
    s.add_argument("--autoscale", action="store_true", help="with --ray: 1..--max-replicas on queue length")
    s.add_argument("--max-replicas", type=_serve_int("--max-replicas"), default=None, help="with --ray --autoscale")
    s.add_argument("--max-connections", type=_serve_int("--max-connections"), default=256, help="open connections")
    s.add_argument("--metrics-key", action="store_true", help="/metrics needs an API key (Authorization: Bearer)")
    return p


def _serve_number(flag: str, kind):
    """argparse type for a zimage serve number: a bad value ends the command with one line naming the flag."""

    def convert(text):
        try:
            return kind(text)
        except (TypeError, ValueError):
            what = "an integer" if kind is int else "a number"
            raise SystemExit(f"zimage serve: {flag} must be {what}, got {str(text)[:40]!r}") from None

    return convert


def _serve_int(flag: str):
    return _serve_number(flag, int)


def _serve_float(flag: str):
    return _serve_number(flag, float)


def _load_callable(spec: str | None, flag: str):
    """``module:callable`` (a module on sys.path or a ``.py`` file path before the colon) -> the callable."""
    if not spec:
        return None
    import importlib
    import importlib.util

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"zimage serve: {flag} takes MODULE:CALLABLE (e.g. mypkg.safety:check), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise SystemExit(f"zimage serve: {flag}: no such file {module_name!r}")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the operator's to fix: one line, no traceback
        raise SystemExit(f"zimage serve: {flag}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SystemExit(f"zimage serve: {flag}: {module_name!r} has no callable {attr!r}")
    return fn


def _serve_extras(args) -> dict:
    """The LoRA store, content checker, face detector and durable-results flags, checked (one-line errors)."""
    from .server import durable

    for flag, spec in (("--content-checker", args.content_checker), ("--face-detector", args.face_detector)):
        if args.ray and spec and spec.rpartition(":")[0].endswith(".py"):  # replicas import it by module name
            raise SystemExit(f"zimage serve: {flag} with --ray needs an importable MODULE:CALLABLE, not a .py path")
    if args.lora_dir is not None and not Path(args.lora_dir).expanduser().is_dir():
        raise SystemExit(f"zimage serve: --lora-dir: {args.lora_dir!r} is not a directory")
    for flag, value in (("--results-items", args.results_items), ("--results-bytes", args.results_bytes)):
        if value < 1:
            raise SystemExit(f"zimage serve: {flag} must be >= 1, got {value}")
    results_dir = None
    if not args.no_durable_results:
        results_dir = Path(args.results_dir).expanduser() if args.results_dir else durable.default_dir(args.port)
        existing = results_dir  # checked, not created here: the server creates it when it starts
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise SystemExit(f"zimage serve: --results-dir: {str(results_dir)!r} cannot be created or written")
    return dict(
        lora_dir=str(Path(args.lora_dir).expanduser()) if args.lora_dir else None,
        content_checker=_load_callable(args.content_checker, "--content-checker"),
        face_detector=_load_callable(args.face_detector, "--face-detector"),
        results_dir=str(results_dir) if results_dir else None,
        results_items=args.results_items,
        results_bytes=args.results_bytes,
    )


def _serve(args) -> int:
    from .service.netpolicy import OutboundPolicy

    try:
        from .server.app import Settings, serve
    except ImportError as e:
        msg = f"zimage serve: needs the [serve] extra ({e.name} is missing): pip install 'zimage-fast[serve]'"
        raise SystemExit(msg) from None

    keys = [k.strip() for k in os.environ.get("ZIMAGE_API_KEYS", "").split(",") if k.strip()]
    if args.api_keys:
        try:
            lines = Path(args.api_keys).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or type(e).__name__
            raise SystemExit(f"zimage serve: --api-keys: cannot read {args.api_keys[:200]!r}: {why}") from None
        file_keys = [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
        if not file_keys:
            raise SystemExit(f"zimage serve: --api-keys: {args.api_keys[:200]!r} holds no key (one per line)")
        keys += file_keys
    try:
        outbound = OutboundPolicy.from_strings(
            args.allow_outbound, args.outbound_allow_net, deadline_s=args.outbound_timeout
        )
    except ValueError as e:
        msg = f"zimage serve: --outbound-allow-net: {str(e)[:200]} (give a network like 10.1.2.0/24)"
        raise SystemExit(msg) from None
    settings = Settings(
        host=args.host,
        port=args.port,
        api_keys=keys,
        queue=args.queue,
        task_timeout_s=args.task_timeout,
        idle_timeout_s=args.idle_timeout,
        public_url=args.public_url,
        output_dir=args.output_dir,
        output_ttl_s=args.output_ttl,
        shutdown_grace_s=args.shutdown_grace,
        outbound=outbound,
        max_connections=args.max_connections,
        metrics_key=args.metrics_key,
        model=args.model,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        kernels=args.kernels,
        quantize=args.quantize,
        **_serve_extras(args),
    )
    if args.ray:
        from .server import ray_app

        if args.replicas < 1:
            raise SystemExit("zimage serve: --replicas must be >= 1")
        if args.max_replicas is not None and args.max_replicas < args.replicas:
            raise SystemExit("zimage serve: --max-replicas must be >= --replicas")
        ray_app.run(settings, replicas=args.replicas, autoscale=args.autoscale, max_replicas=args.max_replicas)
        return 0
    settings.check()  # every range, before anything starts (one line naming the flag)
    return serve(settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import RequestError
    from .weights import CheckpointError

    if args.command == "serve":
        return _serve(args)
    if args.command == "generate" and args.parallel:
        return generate_parallel(args)
    try:
        # everything that can be checked without the model is checked before it loads
        if args.command == "generate":
            args.output_path = check_output_path(args.output)
        else:
            request = read_request(args.request)
        pipe = _load(args)
        from .compile import default_enabled

        if args.compile if args.compile is not None else default_enabled(pipe.device):
            pipe.optimize()
        if args.command == "generate":
            return _generate(pipe, args)
        return _infer(pipe, request)
    except (RequestError, CheckpointError) as e:
        print(f"zimage: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable files, full disks: one line, no traceback
        print(f"zimage: error: {e.strerror or type(e).__name__}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


def _infer(pipe, request) -> int:
    """Run each task of a request (one object or an array); a bad task is reported without discarding the others'
    results. Exit status 2 when any task failed."""
    from .errors import RequestError

    tasks = request if isinstance(request, list) else [request]
    out, errors = [], []
    for i, task in enumerate(tasks):
        try:
            out.extend(pipe.infer(task))
        except RequestError as e:
            err = {**e.to_dict(), "task": i}
            if isinstance(task, dict) and isinstance(task.get("taskUUID"), str):
                err["taskUUID"] = task["taskUUID"][:64]
            errors.append(err)
            print(f"zimage: error: task {i}: {e}", file=sys.stderr)
    result = {"data": out}
    if errors:
        result["errors"] = errors
    print(json.dumps(result, indent=2))
    return 2 if errors else 0


def _generate(pipe, args) -> int:
    result = pipe.generate(args.prompt, **generate_kwargs(pipe, args))
    write_results(result, args)
    return 0


def generate_kwargs(pipe, args) -> dict:
    """``pipe.generate`` keyword arguments from the parsed ``generate`` command line (the prompt aside)."""
    cache = _cache_config(pipe, args)
    controlnets = _controlnets(pipe, args)
    return dict(
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        scheduler=args.scheduler,
        number_results=args.number_results,
        strength=args.strength,
        seed_image=args.seed_image,
        mask_image=args.mask_image,
        mask_margin=args.mask_margin,
        outpaint=args.outpaint,
        cfg_normalization=args.cfg_normalization,
        cfg_truncation=args.cfg_truncation,
        shift=args.shift,
        model=args.preset_model,
        cache=cache,
        progress=not args.quiet,
        controlnets=controlnets,
        read_paths=True,  # the command line's --seed-image/--mask-image are local files
    )


def write_results(result, args) -> None:
    """Save the images and print what was written."""
    out = getattr(args, "output_path", None) or Path(args.output)
    paths = (
        [out]
        if len(result.images) == 1
        else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(result.images))]
    )
    for image, path in zip(result.images, paths):
        image.save(path, format=OUTPUT_SUFFIXES[path.suffix.lower()])
    t = result.stats["timings"]
    for path, s in zip(paths, result.seeds):
        print(f"wrote {path} (seed {s})")
    cached = ""
    if result.stats.cache:  # one summary per result with a step cache
        ran = sum(c["main_layer_evals"] for c in result.stats.cache)
        full = sum(c["main_layer_evals_uncached"] for c in result.stats.cache)
        cached = f", step cache {result.stats.cache[0]['method']}: {ran} of {full} main-layer evaluations"
    print(
        f"{result.stats['steps']} steps, {result.stats['forwards']} transformer forwards{cached}, "
        f"{t['total_s']:.2f} s total (denoise {t['denoise_s']:.2f} s)"
    )


def _controlnets(pipe, args) -> list:
    from . import controlnet as cn_mod
    from .errors import RequestError

    images = args.control_image or []
    models = args.control_model or [cn_mod.BUILTIN_ID] * len(images)
    weights = args.control_weight or [cn_mod.DEFAULT_WEIGHT]
    if models and not images:
        raise RequestError("--control-model", "needs --control-image")
    if len(models) != len(images):
        raise RequestError("--control-model", f"give one per --control-image ({len(images)}), got {len(models)}")
    if len(weights) not in (1, len(images)):
        raise RequestError("--control-weight", f"give one value or one per --control-image ({len(images)})")
    weights = weights * len(images) if len(weights) == 1 else weights
    types = args.control_type or [None]
    if len(types) not in (1, len(images)):
        raise RequestError("--control-type", f"give one value or one per --control-image ({len(images)})")
    types = types * len(images) if len(types) == 1 else types
    return [
        cn_mod.ControlNetInput(
            cn_mod.resolve_local(pipe, m, "--control-model"),
            image,
            w,
            args.control_start,
            args.control_end,
            args.control_mode,
            field="--control",
            control_type=t,
        )
        for image, m, w, t in zip(images, models, weights, types)
    ]


# ---------------------------------------------------------------------------------------------------------------
# ``zimage generate --parallel ulysses=2,cfg=2 ...``: the same command on ``ulysses·ring·cfg`` ranks.
#
# Without torchrun the command spawns the ranks itself (``launch``; one GPU each when there are enough, else gloo on
# CPU). Under ``torchrun --nproc-per-node N -m zimage_core.cli generate --parallel ...`` each process is one rank.
# Every rank loads the pipeline and runs the request; rank 0 writes the images and prints. Bad input fails every rank
# with the same field error (exit code 2); a rank that crashes ends the run (exit code 1).
# ---------------------------------------------------------------------------------------------------------------

PARALLEL_START_ENV = "ZIMAGE_PARALLEL_START"  # spawn (default) or fork
PARALLEL_RUN_TIMEOUT_ENV = "ZIMAGE_PARALLEL_RUN_TIMEOUT"  # seconds for the whole spawned run (default 3600)


def _error(message: str) -> None:
    print(f"zimage: error: {message}", file=sys.stderr)


def generate_parallel(args) -> int:
    import torch.distributed as dist

    from .parallel.config import ParallelConfig
    from .parallel.launch import LaunchError, launch
    from .parallel.mesh import init_distributed

    try:
        config = ParallelConfig.parse(args.parallel)
    except ValueError as e:
        _error(f"--parallel: {e}")
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: this process is one rank
        init_distributed()
        try:
            return rank_generate(dist.get_rank(), config, args)
        finally:
            dist.destroy_process_group()
    backend = "gloo" if str(args.device or "").startswith("cpu") else None  # None: NCCL when there are enough GPUs
    try:
        codes = launch(
            rank_generate,
            config.world_size,
            (config, args),
            backend=backend,
            timeout_s=float(os.environ.get(PARALLEL_RUN_TIMEOUT_ENV, 3600)),
            start_method=os.environ.get(PARALLEL_START_ENV, "spawn"),
        )
    except (LaunchError, TimeoutError) as e:
        _error(str(e))
        return 1
    return max(codes)


def rank_generate(rank: int, config, args) -> int:
    import torch
    import torch.distributed as dist

    from .errors import RequestError
    from .parallel.runtime import ParallelContext
    from .weights import CheckpointError

    if dist.get_backend() == "nccl":
        args.device = f"cuda:{torch.cuda.current_device()}"
    elif args.device is None:
        args.device = "cpu"
    try:
        ctx = ParallelContext(config)
        pipe = _load(args)
        kwargs = generate_kwargs(pipe, args)
        kwargs["progress"] = kwargs["progress"] and rank == 0
        result = ctx.generate(pipe, args.prompt, **kwargs)
    except (RequestError, CheckpointError, FileNotFoundError, ValueError) as e:
        if rank == 0:
            _error(str(e))
        return 2
    if rank == 0:
        write_results(result, args)
        print(f"parallel: {config.describe()} on {config.world_size} ranks ({dist.get_backend()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
