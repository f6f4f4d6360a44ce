"""The `zimage` command line: generate and infer, on the embedded default model."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from zimage_core.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # the embedded default (or its random stand-in) and URL outputs go to a per-session cache
    monkeypatch.setenv("ZIMAGE_CACHE", str(tmp_path_factory.getbasetemp() / "zcache"))


def test_console_script_generate_writes_an_image(tmp_path):
    exe = Path(sys.executable).with_name("zimage")
    assert exe.exists(), "the zimage console script is not installed (pip install -e .)"
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [
            str(exe),
            "generate",
            "a red circle",
            "-o",
            str(out),
            "--width",
            "128",
            "--height",
            "128",
            "--steps",
            "2",
            "--seed",
            "4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "seed 4" in proc.stdout
    assert Image.open(out).size == (128, 128)


def test_generate_several_results_and_image_to_image(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert (
        main(
            [
                "generate",
                "blue square",
                "-o",
                str(out),
                "--width",
                "128",
                "--height",
                "144",
                "--steps",
                "2",
                "-n",
                "2",
                "--seed",
                "10",
                "--quiet",
            ]
        )
        == 0
    )
    a, b = tmp_path / "o-0.png", tmp_path / "o-1.png"
    assert Image.open(a).size == (128, 144) and Image.open(b).size == (128, 144)
    assert "seed 11" in capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                "blue square",
                "-o",
                str(tmp_path / "i.png"),
                "--seed-image",
                str(a),
                "--strength",
                "0.5",
                "--steps",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "i.png").size == (128, 144)


def test_generate_bad_argument_exits_2_naming_it(tmp_path, capsys):
    assert main(["generate", "x y", "-o", str(tmp_path / "x.png"), "--width", "100", "--height", "128"]) == 2
    assert "width" in capsys.readouterr().err
    assert main(["generate", "x y", "--scheduler", "Eular"]) == 2
    assert "Euler" in capsys.readouterr().err


def test_infer_prints_response_json(tmp_path, capsys):
    req = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:z-image@0",
        "positivePrompt": "a green triangle",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 5,
        "outputType": "dataURI",
    }
    path = tmp_path / "req.json"
    path.write_text(json.dumps(req))
    assert main(["infer", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert data[0]["taskUUID"] == req["taskUUID"] and data[0]["imageDataURI"].startswith("data:image/jpeg")
    path.write_text(json.dumps({**req, "steps": 500}))
    assert main(["infer", str(path)]) == 2
    assert "steps" in capsys.readouterr().err
    path.write_text("{not json")
    assert main(["infer", str(path)]) == 2
