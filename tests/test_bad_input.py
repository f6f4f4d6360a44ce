"""Bad input at the library's edges: each case of the hostile-client campaign that once escaped as a non-RequestError,
was accepted but wrong, or was wrongly refused. Expected outcomes come from the spec and the documented limits."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from zimage_core import RequestError
from zimage_core import images as imgs


def _b64(im: Image.Image, fmt: str, **kw) -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


def _gradient(mode="RGB", size=(64, 48)) -> Image.Image:
    arr = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) % 251).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(arr, "RGB")


# ---- image decoding ------------------------------------------------------------------------------------------------


def test_lab_tiff_mask_decodes_to_a_convertible_mode():
    lab = _gradient().convert("LAB")
    for value in (_b64(lab, "TIFF"), lab):  # as a request string and as a Python caller's PIL image
        im = imgs.load_image(value, "inputs.maskImage")
        assert im.mode in ("RGB", "RGBA", "L")
        mask = im.convert("L")
        assert mask.size == (64, 48)


def test_mime_base64_with_line_breaks_is_accepted():
    im = _gradient()
    raw = base64.b64decode(_b64(im, "PNG"))
    mime = base64.encodebytes(raw).decode()  # 76-character lines joined by \n
    assert "\n" in mime.strip()
    crlf = mime.replace("\n", "\r\n")
    for value in (mime, crlf, "data:image/png;base64," + crlf):
        out = imgs.load_image(value, "inputs.seedImage")
        assert np.array_equal(np.asarray(out), np.asarray(im))


def _eps_bytes() -> bytes:
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
        b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill\nshowpage\n%%EOF\n"
    )


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "TGA", "PCX", "ICO", "SGI", "IM"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    if fmt == "EPS":
        raw = _eps_bytes()
    else:
        buf = io.BytesIO()
        _gradient(size=(16, 16)).save(buf, format=fmt)
        raw = buf.getvalue()
    with pytest.raises(RequestError) as e:
        imgs.load_image(base64.b64encode(raw).decode(), "inputs.seedImage")
    assert e.value.field == "inputs.seedImage" and "allowed formats" in e.value.message


def test_eps_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    def boom(*a, **k):
        raise AssertionError("Ghostscript was invoked")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", boom)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    with pytest.raises(RequestError):
        imgs.load_image(base64.b64encode(_eps_bytes()).decode(), "inputs.seedImage")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"])
def test_every_mode_decodes_to_a_convertible_mode(mode):
    im = _gradient(mode if mode not in ("I;16",) else "I")
    if mode == "I;16":
        im = _gradient("I").convert("I;16")
    saved = 0
    for fmt in imgs.INPUT_FORMATS:
        try:
            value = _b64(im, fmt)
        except (OSError, ValueError, KeyError):
            continue  # this format cannot store this mode
        saved += 1
        out = imgs.load_image(value, "inputs.seedImage")
        assert out.mode in ("RGB", "RGBA", "L"), (mode, fmt, out.mode)
        out.convert("RGB"), out.convert("L")
    assert saved >= 1 or mode in ("HSV",)
    out = imgs.load_image(im, "inputs.seedImage")  # the PIL image itself
    out.convert("RGB"), out.convert("L")
