"""The package as a user installs it: sdist and wheel built from the checkout, the wheel installed into a clean venv
beside Hugging Face's ``kernels`` (the current set, requirements/lock-current.txt), used from a folder outside the
checkout. Marker ``current``: run by the ``current`` CTest tier only (scripts/current_tier.sh), whose interpreter has
the current set installed (the clean venv is filled from pip's cache of that install).

References independent of the code under test: the checkout's file list (what the archives must hold), the pixel
checker of the default model's dataset (what the generated image must show), and Hugging Face's own distribution
record of ``kernels`` (which file ``import kernels`` must load).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.current

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-current.txt"
PROMPT = "a large red circle in the top left on a blue background"  # README's first command
ASSETS = ("zimage_core/assets/default", "zimage_core/assets/default-controlnet")


def _run(cmd, cwd, timeout=900, env=None, check=True):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _clean_env() -> dict:
    """The user's environment: no PYTHONPATH into the checkout, no interpreter flag of the test session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON_", "ZIMAGE_", "PYTEST"))}
    env["PIP_CONSTRAINT"] = str(LOCK)  # the current set, and only it (replaces a machine-wide pip constraint)
    return env


def _repo_files(under: str) -> set[str]:
    files = {str(p.relative_to(REPO)) for p in (REPO / under).rglob("*") if p.is_file()}
    return {f for f in files if "__pycache__" not in f}


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """sdist built from a copy of the checkout, then the wheel built from that sdist (so the sdist is complete)."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    keep = ("zimage_core", "zimage_kernels", "zimage_bench", "pyproject.toml", "README.md")
    src.mkdir()
    for name in keep:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results"))
        else:
            shutil.copy2(p, src / name)
    out = tmp / "out"
    build = "import sys, setuptools.build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    name = _run([sys.executable, "-c", build, "build_sdist", out], cwd=src).stdout.strip().splitlines()[-1]
    sdist = out / name
    with tarfile.open(sdist) as t:
        t.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    name = _run([sys.executable, "-c", build, "build_wheel", out], cwd=unpacked).stdout.strip().splitlines()[-1]
    return {"sdist": sdist, "wheel": out / name}


def test_wheel_and_sdist_hold_the_embedded_models(dists):
    want = set().union(*(_repo_files(a) for a in ASSETS))
    assert len(want) >= 4, want  # weights, config and tokenizer files of each model
    in_wheel = set(zipfile.ZipFile(dists["wheel"]).namelist())
    assert want <= in_wheel, sorted(want - in_wheel)
    with tarfile.open(dists["sdist"]) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert want <= in_sdist, sorted(want - in_sdist)
    # the import names are ours, and nothing installs a top-level `kernels` or `bench`
    tops = {n.split("/", 1)[0] for n in in_wheel if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert {"zimage_core", "zimage_kernels", "zimage_bench"} <= tops, tops
    assert all(t.startswith("zimage_") for t in tops), tops


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory) -> Path:
    """A clean venv (no system site-packages) with our wheel ([serve] extra) and Hugging Face's kernels."""
    root = tmp_path_factory.mktemp("venv")
    base = getattr(sys, "_base_executable", None) or shutil.which("python3")
    _run([base, "-m", "venv", root / "v"], cwd=root)
    py = root / "v" / "bin" / "python"
    wheel = dists["wheel"]
    cmd = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    cmd += [f"zimage-fast[serve] @ {wheel.as_uri()}"]
    _run([*cmd, "kernels"], cwd=root, timeout=1500, env=_clean_env())
    return root / "v" / "bin"


def test_import_kernels_is_still_hugging_faces(venv, tmp_path):
    probe = (
        "import importlib.metadata as m, json, pathlib, kernels, zimage_kernels, zimage_core\n"
        "d = m.distribution('kernels')\n"
        "own = [str(d.locate_file(f).resolve()) for f in d.files if str(f) == 'kernels/__init__.py']\n"
        "print(json.dumps({'kernels': str(pathlib.Path(kernels.__file__).resolve()), 'own': own,\n"
        "  'ours': [m.__file__ for m in (zimage_kernels, zimage_core)], 'hf_api': hasattr(kernels, 'get_kernel'),\n"
        "  'owner': m.packages_distributions().get('kernels')}))\n"
        "from kernels import CUDAProperties, get_kernel  # what transformers/diffusers import from it\n"
        "from diffusers.loaders import ZImageLoraLoaderMixin  # failed with our old top-level `kernels`\n"
    )
    r = json.loads(_run([venv / "python", "-c", probe], cwd=tmp_path).stdout)
    assert r["own"] == [r["kernels"]], r  # `import kernels` loads the file Hugging Face's distribution installed
    assert r["owner"] == ["kernels"], r  # and no other distribution provides a top-level `kernels`
    assert r["hf_api"], r
    for f in r["ours"]:
        assert "site-packages" in f and not Path(f).resolve().is_relative_to(REPO), f


def test_zimage_generate_from_a_folder_outside_the_checkout(venv, tmp_path):
    from PIL import Image

    from zimage_core.train import dataset
    from zimage_core.train.checker import read_image

    res = _run([venv / "zimage", "generate", PROMPT, "--seed", "0", "-o", "out.png"], cwd=tmp_path, env=_clean_env())
    img = Image.open(tmp_path / "out.png")
    assert img.size == (128, 128), img.size
    reading = read_image(img)
    assert reading.agrees(dataset.Scene.from_caption(PROMPT)), (reading, res.stdout[-500:])


def test_editable_install_generates_the_same_image_outside_the_checkout(venv, tmp_path):
    """This interpreter (the current set, editable checkout) and the wheel's venv give the same pixels."""
    import numpy as np
    from PIL import Image

    zimage = Path(sys.executable).parent / "zimage"
    assert zimage.exists(), zimage
    for name, exe in (("checkout.png", zimage), ("wheel.png", venv / "zimage")):
        _run([exe, "generate", PROMPT, "--seed", "3", "-o", name], cwd=tmp_path, env=_clean_env())
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("checkout.png", "wheel.png"))
    assert a.shape == (128, 128, 3) and np.array_equal(a, b)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zimage_serve_answers_an_image_inference_task(venv, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(venv / "zimage"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=_clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/healthz?ready=1", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        task = {
            "taskType": "imageInference",
            "taskUUID": str(uuid.uuid4()),
            "model": "runware:z-image@0",
            "positivePrompt": PROMPT,
            "width": 128,
            "height": 128,
            "seed": 0,
            "deliveryMethod": "sync",
            "outputType": "base64Data",
        }
        req = urllib.request.Request(
            f"{base}/v1",
            data=json.dumps([{"taskType": "authentication", "apiKey": "k"}, task]).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            body = json.loads(r.read())
        (item,) = [d for d in body["data"] if d.get("taskType") == "imageInference"]
        assert item["taskUUID"] == task["taskUUID"]
        from PIL import Image

        from zimage_core.train import dataset
        from zimage_core.train.checker import read_image

        img = Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"])))
        assert img.size == (128, 128)
        assert read_image(img).agrees(dataset.Scene.from_caption(PROMPT))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
