"""Input images (base64, data URIs, earlier outputs), masks, inpainting crops, outpainting canvases, output encoding."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import RequestError, show

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
DATA_URI_RE = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.IGNORECASE)
MAX_INPUT_BYTES = 64 * 2**20  # decoded input image size limit
MAX_INPUT_PIXELS = 4096 * 4096
# Decoders that may see client bytes. Every other Pillow plugin (EPS hands the data to Ghostscript, and dozens of
# rarely used formats) is never tried.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
WHITESPACE_RE = re.compile(r"\s+")


def load_image(value, field: str, outputs=None, allow_paths: bool = False) -> Image.Image:
    """Decode an input image: a PIL image, a data URI, base64, an imageUUID of an earlier output (``outputs``:
    anything with ``get(uuid) -> image | None``, the service's output store), or (Python API only) a local path.
    Remote URLs are refused: fetching them from a GPU server is a server-side request forgery hole."""
    if isinstance(value, Image.Image):
        if value.mode in ("RGB", "RGBA", "L"):
            return value
        try:
            return value.convert("RGBA" if "A" in value.mode or "a" in value.mode else "RGB")
        except (ValueError, OSError) as e:
            raise RequestError(field, f"image mode {value.mode!r} cannot be converted to RGB ({e})") from None
    if not isinstance(value, str) or not value.strip():
        raise RequestError(field, "must be a base64 image, a data URI or the imageUUID of an earlier output")
    value = value.strip()
    if UUID_RE.match(value):
        image = outputs.get(value) if outputs is not None else None
        if image is None:
            raise RequestError(field, f"no earlier output with imageUUID {value} is held by this model")
        return image
    if value.lower().startswith(("http://", "https://", "ftp://", "file://")):
        raise RequestError(field, "fetching images from URLs is disabled; send base64, a data URI or an imageUUID")
    if allow_paths and len(value) < 4096 and not DATA_URI_RE.match(value):
        from pathlib import Path

        p = Path(value).expanduser()
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff") and p.is_file():
            return _open(p.read_bytes(), field)
    payload = DATA_URI_RE.sub("", value, count=1)
    if len(payload) > (MAX_INPUT_BYTES * 4 // 3 + 4) * 77 // 76 + 2:  # MIME base64 adds CRLF every 76 characters
        raise RequestError(field, f"image is larger than {MAX_INPUT_BYTES // 2**20} MiB")
    payload = WHITESPACE_RE.sub("", payload)  # MIME-style base64 carries line breaks
    if len(payload) > MAX_INPUT_BYTES * 4 // 3 + 4:
        raise RequestError(field, f"image is larger than {MAX_INPUT_BYTES // 2**20} MiB")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is neither valid base64, a data URI nor an imageUUID") from None
    return _open(raw, field)


def _open(raw: bytes, field: str) -> Image.Image:
    """Decode with the allow-listed decoders only; the result is in mode RGB, RGBA or L, so that every later
    ``convert`` works. Any decoder failure on corrupted data is a RequestError naming the field."""
    try:
        with Image.open(io.BytesIO(raw), formats=INPUT_FORMATS) as im:
            if im.width * im.height > MAX_INPUT_PIXELS:
                raise RequestError(field, f"image of {im.width}x{im.height} exceeds {MAX_INPUT_PIXELS} pixels")
            if im.width < 1 or im.height < 1:
                raise RequestError(field, "image has no pixels")
            im.load()
            if im.mode in ("RGB", "RGBA", "L"):
                return im.copy()
            has_alpha = im.mode in ("LA", "La", "PA", "RGBa") or (im.mode == "P" and "transparency" in im.info)
            return im.convert("RGBA" if has_alpha else "RGB")
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(
            field, f"could not be decoded as an image (allowed formats: {', '.join(INPUT_FORMATS)})"
        ) from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types on corrupted data; none may escape
        raise RequestError(field, f"could not be decoded as an image ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------------------------
# Working inputs: what the sampler sees (seed image tensor, mask) and how the output is put back together
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Work:
    width: int
    height: int
    image: torch.Tensor | None = None  # [1, 3, H, W] in [-1, 1] at the working size
    mask: torch.Tensor | None = None  # [1, 1, H, W] binary, 1 = repaint
    paste: tuple | None = None  # (original PIL, box, box-size mask PIL) for mask-margin crops

    def mask_latents(self, pipe) -> torch.Tensor:
        m = pipe.size_multiple
        return F.interpolate(self.mask, size=(2 * (self.height // m), 2 * (self.width // m)), mode="nearest")

    def finish(self, generated: Image.Image) -> Image.Image:
        """The output image: for a mask-margin crop, the generated crop pasted back into the original."""
        if self.paste is None:
            return generated
        original, box, mask = self.paste
        out = original.convert("RGB").copy()
        patch = generated.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS)
        out.paste(patch, box[:2], mask)
        return out


def _round_down(v: int, m: int) -> int:
    return max(m, v // m * m)


OUTPAINT_MAX_BLUR = 32  # outpaint.blur (the official clients' field): pixels of the original repainted at the seam


def _check_outpaint(outpaint) -> tuple[int, int, int, int]:
    if not isinstance(outpaint, dict):
        raise RequestError("outpaint", "must be an object with top/bottom/left/right pixel counts")
    unknown = set(outpaint) - {"top", "bottom", "left", "right", "blur"}
    if unknown:
        raise RequestError(f"outpaint.{sorted(unknown)[0]}", "unknown field; allowed: top, bottom, left, right, blur")
    blur = outpaint.get("blur", 0)
    if isinstance(blur, bool) or not isinstance(blur, int) or not 0 <= blur <= OUTPAINT_MAX_BLUR:
        raise RequestError("outpaint.blur", f"must be an integer in [0, {OUTPAINT_MAX_BLUR}], got {show(blur)}")
    vals = []
    for side in ("top", "bottom", "left", "right"):
        v = outpaint.get(side, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 4096:
            raise RequestError(f"outpaint.{side}", f"must be an integer in [0, 4096], got {show(v)}")
        vals.append(v)
    return tuple(vals)


def _expand_box(box, margin, target_aspect, size):
    """box (x0, y0, x1, y1) grown by margin, then to the target aspect ratio, clamped to the image."""
    W, H = size
    x0, y0, x1, y1 = max(0, box[0] - margin), max(0, box[1] - margin), min(W, box[2] + margin), min(H, box[3] + margin)
    bw, bh = x1 - x0, y1 - y0
    if bw / bh < target_aspect:  # too tall: widen
        bw = min(W, round(bh * target_aspect))
    else:
        bh = min(H, round(bw / target_aspect))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0 = int(min(max(0, round(cx - bw / 2)), W - bw))
    y0 = int(min(max(0, round(cy - bh / 2)), H - bh))
    return x0, y0, x0 + bw, y0 + bh


def prepare_inputs(
    pipe, *, seed_image, mask_image, mask_margin, outpaint, width, height, default_size, allow_paths=False
) -> Work:
    """Resolve the conditioning images into a :class:`Work` at the working resolution."""
    m = pipe.size_multiple
    if (width is None) != (height is None):
        raise RequestError("width" if width is None else "height", "width and height must be given together")
    if seed_image is None:
        for name, v in (("mask_image", mask_image), ("mask_margin", mask_margin), ("outpaint", outpaint)):
            if v is not None:
                raise RequestError(name, "needs a seed image")
        w, h = (width, height) if width is not None else default_size
        return Work(w, h)

    image = load_image(seed_image, "seed_image", None, allow_paths).convert("RGB")
    mask = None
    if mask_image is not None:
        mask = load_image(mask_image, "mask_image", None, allow_paths).convert("L")
        if mask.size != image.size:  # another size of the same aspect ratio is resized; another aspect is refused
            (mw, mh), (iw, ih) = mask.size, image.size
            if abs(mw * ih - mh * iw) > max(mw, mh, iw, ih):  # more than a pixel of rounding apart
                raise RequestError(
                    "mask_image", f"the mask ({mw}x{mh}) must have the seed image's aspect ratio ({iw}x{ih})"
                )
            mask = mask.resize(image.size, Image.NEAREST)

    if outpaint is not None:
        top, bottom, left, right = _check_outpaint(outpaint)
        W, H = image.width + left + right, image.height + top + bottom
        if width is not None and (width, height) != (W, H):
            raise RequestError(
                "outpaint",
                f"final size {width}x{height} must equal the seed image {image.width}x{image.height} plus the "
                f"extensions (left+right {left + right}, top+bottom {top + bottom}) = {W}x{H}",
            )
        if W % m or H % m:
            raise RequestError("outpaint", f"the extended canvas {W}x{H} must be a multiple of {m} in both sides")
        arr = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
        keep = np.zeros((H, W), dtype=np.uint8)
        keep[top : top + image.height, left : left + image.width] = 255
        new_mask = 255 - keep
        if mask is not None:  # a mask on the original region is combined with the new margins
            new_mask[top : top + image.height, left : left + image.width] = np.asarray(mask)
        b = outpaint.get("blur", 0)
        if b:  # the seam is repainted too: a band of `blur` pixels of the original along each extended side
            y1, x1 = top + image.height, left + image.width
            if top:
                new_mask[top : top + b, left:x1] = 255
            if bottom:
                new_mask[max(top, y1 - b) : y1, left:x1] = 255
            if left:
                new_mask[top:y1, left : left + b] = 255
            if right:
                new_mask[top:y1, max(left, x1 - b) : x1] = 255
        image, mask = Image.fromarray(arr), Image.fromarray(new_mask)
        width, height = W, H

    paste = None
    if mask_margin is not None:
        if mask is None:
            raise RequestError("mask_margin", "needs a mask image")
        marr = np.asarray(mask) > 127
        if not marr.any():
            raise RequestError("mask_image", "the mask has no white (to repaint) pixels")
        ys, xs = np.nonzero(marr)
        tw, th = (width, height) if width is not None else (_round_down(image.width, m), _round_down(image.height, m))
        box = _expand_box(
            (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), mask_margin, tw / th, image.size
        )
        paste = (image, box, mask.crop(box))  # a soft (feathered) mask blends the seam
        image, mask = image.crop(box), mask.crop(box)
        width, height = tw, th
    elif width is None:
        if image.width < m or image.height < m:
            raise RequestError("seed_image", f"must be at least {m}x{m} pixels, got {image.width}x{image.height}")
        width, height = _round_down(image.width, m), _round_down(image.height, m)

    tensor = pipe.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
    mask_t = None
    if mask is not None:
        mask_t = pipe.mask_processor.preprocess(mask, height=height, width=width).to(torch.float32)
        if not (mask_t > 0.5).any() and outpaint is None:
            raise RequestError("mask_image", "the mask has no white (to repaint) pixels")
    return Work(width, height, tensor, mask_t, paste)
