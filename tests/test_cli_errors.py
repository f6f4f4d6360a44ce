"""The CLI's clean errors: every bad input is one ``zimage: error: ...`` line and exit status 2, no traceback; what
can be checked without the model is checked before it loads."""

from __future__ import annotations

import json
import uuid

import pytest

from zimage_core import cli
from zimage_core.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ZIMAGE_CACHE", str(tmp_path_factory.getbasetemp() / "zcache"))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model would be loaded: these errors must come first."""

    def refuse(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load", refuse)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _req(**kw) -> dict:
    r = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:z-image@0",
        "positivePrompt": "a green triangle",
        "width": 128,
        "height": 128,
        "steps": 1,
        "seed": 5,
        "outputType": "dataURI",
    }
    r.update(kw)
    return r


@pytest.mark.parametrize(
    "content",
    [
        None,  # missing file
        "dir",  # a folder
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        b'{"seed": 1' + b"0" * 5000 + b"}",  # an integer of 5000 digits
    ],
    ids=["missing", "folder", "not-utf8", "deep", "huge-int"],
)
def test_bad_request_file_is_one_line_before_the_model_loads(tmp_path, capsys, no_model, content):
    path = tmp_path / "req.json"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert main(["infer", str(path)]) == 2
    assert "zimage: error: request" in _err(capsys)


@pytest.mark.parametrize("value", ["nan", "inf", "5", "-0.1", "abc"])
def test_cache_threshold_out_of_range_is_a_usage_error(capsys, no_model, value):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x y", "--cache", "fb", "--cache-threshold", value])
    assert e.value.code == 2
    assert "--cache-threshold" in _err(capsys)


@pytest.mark.parametrize("name", ["out.xyz", "out", "folder"])
def test_output_path_checked_before_the_model_loads(tmp_path, capsys, no_model, name):
    (tmp_path / "folder").mkdir()
    assert main(["generate", "x y", "-o", str(tmp_path / name)]) == 2
    assert "output" in _err(capsys)
    assert main(["generate", "x y", "-o", str(tmp_path / "missing" / "o.png")]) == 2
    assert "does not exist" in _err(capsys)


def test_array_of_tasks_keeps_good_results_and_reports_the_bad_one(tmp_path, capsys):
    good, bad = _req(), _req(steps=500)
    path = tmp_path / "req.json"
    path.write_text(json.dumps([good, bad, _req(seed=6)]))
    assert main(["infer", str(path)]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [d["seed"] for d in out["data"]] == [5, 6]
    assert out["errors"] == [
        {
            "error": "invalid_request",
            "field": "steps",
            "message": out["errors"][0]["message"],
            "task": 1,
            "taskUUID": bad["taskUUID"],
        }
    ]
    assert "task 1: steps" in captured.err and "Traceback" not in captured.err


def test_generate_writes_the_format_of_the_extension(tmp_path):
    from PIL import Image

    out = tmp_path / "o.JPEG"
    assert main(["generate", "blue square", "-o", str(out), "--width", "128", "--height", "128", "--steps", "1",
                 "--quiet"]) == 0  # fmt: skip
    assert Image.open(out).format == "JPEG"
