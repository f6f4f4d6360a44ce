"""``zimage``: the command line.

zimage generate "a large red circle in the top left on a blue background" -o out.png
zimage infer request.json            # prints the imageInference response JSON
"""

from __future__ import annotations

import argparse
import json
import math
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
    if args.model:
        return ZImage.from_pretrained(args.model, device=args.device, dtype=dtype, kernel_backend=args.kernels)
    return ZImage.default(device=args.device, dtype=dtype, kernel_backend=args.kernels)


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
    g.add_argument("--cache", choices=["fb", "tea", "db"], help="step cache")
    g.add_argument("--cache-threshold", type=_threshold, help="step cache threshold in [0, 1]")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("infer", parents=[common], help="run an imageInference request (JSON file or - for stdin)")
    i.add_argument("request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import RequestError
    from .weights import CheckpointError

    try:
        # everything that can be checked without the model is checked before it loads
        if args.command == "generate":
            args.output_path = check_output_path(args.output)
        else:
            request = read_request(args.request)
        pipe = _load(args)
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
    cache = None
    if args.cache:
        from zimage_core.cache import CacheConfig

        cache = CacheConfig.for_method(args.cache, threshold=args.cache_threshold, pipe=pipe, preset=args.preset_model)
    result = pipe.generate(
        args.prompt,
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
        read_paths=True,  # the command line's --seed-image/--mask-image are local files
    )
    out = args.output_path
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
    print(
        f"{result.stats['steps']} steps, {result.stats['forwards']} transformer forwards, "
        f"{t['total_s']:.2f} s total (denoise {t['denoise_s']:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
