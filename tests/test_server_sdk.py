"""The newer official client ``runware-sdk`` (1.8.0) over REST against the server. It imports as ``runware`` like the
older client, so it lives in its own virtual environment (``build/runware-sdk-venv``, created on first use with pip;
``ZIMAGE_RUNWARE_SDK_PYTHON`` points at an existing interpreter that has it) and runs as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.server_helpers import ROOT, ServerThread

SDK = "runware-sdk==1.8.0"


@pytest.fixture(scope="module")
def sdk_python() -> str:
    given = os.environ.get("ZIMAGE_RUNWARE_SDK_PYTHON")
    if given:
        return given
    venv = ROOT / "build" / "runware-sdk-venv"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import importlib.metadata as m; assert m.version('runware-sdk') == '1.8.0'"]
    if not py.exists() or subprocess.run(check, capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", SDK], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.fail(f"could not install {SDK} into {venv} (needs the package index):\n{r.stderr[-2000:]}")
    return str(py)


CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from runware import Runware

    BASE = sys.argv[1]
    T = {"taskType": "imageInference", "model": "runware:z-image@0", "positivePrompt": "a red circle",
         "width": 128, "height": 128, "steps": 2}

    async def main():
        out = {}
        async with Runware(api_key="k", transport="rest", http_base_url=BASE, timeout=60000) as c:
            r = await c.run({**T, "outputType": "base64Data", "seed": 4})  # default delivery: async + getResponse
            out["async"] = [{k: v for k, v in x.items() if k != "imageBase64Data"} for x in r]
            r = await c.run({**T, "deliveryMethod": "sync", "numberResults": 2, "seed": 10})
            out["sync"] = r
            try:
                await c.run({**T, "width": 120})
            except Exception as e:
                out["error"] = {"type": type(e).__name__, "code": getattr(e, "code", None),
                                "parameter": getattr(e, "parameter", None), "status": getattr(e, "status_code", None)}
        ws = BASE.replace("http://", "ws://")
        async with Runware(api_key="k", transport="websocket", ws_base_url=ws, timeout=60000) as c:
            r = await c.run({**T, "outputType": "base64Data", "seed": 20})
            out["ws_async"] = [x["seed"] for x in r]
            r = await c.run({**T, "deliveryMethod": "sync", "numberResults": 2, "seed": 30})
            out["ws_sync"] = sorted(x["seed"] for x in r)
        async with Runware(api_key="wrong", transport="rest", http_base_url=BASE, timeout=20000, max_retries=0) as c:
            try:
                await c.run({**T, "deliveryMethod": "sync"})
            except Exception as e:
                out["auth"] = {"code": getattr(e, "code", None), "status": getattr(e, "status_code", None)}
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def test_runware_sdk_over_rest_and_websocket(sdk_python, tiny_pipe, tmp_path: Path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with ServerThread(tiny_pipe, api_keys=["k"]) as s:
        r = subprocess.run(
            [sdk_python, str(script), f"{s.base}/v1"], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["seed"] for x in out["async"]] == [4] and out["async"][0]["status"] == "success"
    assert sorted(x["seed"] for x in out["sync"]) == [10, 11]
    assert all(x["imageURL"].startswith(s.base + "/image/") for x in out["sync"])
    assert out["error"]["parameter"] == "width" and out["error"]["status"] == 400
    assert out["auth"]["status"] == 401
    assert out["ws_async"] == [20] and out["ws_sync"] == [30, 31]  # and over WebSocket
