"""Issue 23 item 3, "Library": each case below failed on the code before the fix (a FloatingPointError instead of an
error on ``lora[i]``; the start field named for an end that rounds to step 0; a one-character ultralytics prompt
accepted; async results held by count only)."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import image_request
from zimage_core.errors import RequestError
from zimage_core.lora import LoraStore
from zimage_core.service import ServerConfig
from zimage_core.service.taskregistry import TaskRegistry


def _refused(pipe, request, config=None) -> RequestError:
    with pytest.raises(RequestError) as e:
        pipe.infer(request, config)
    return e.value


@pytest.mark.parametrize("alpha", [1e38, 1e300])
def test_lora_whose_alpha_overflows_names_the_lora(tiny_pipe, tmp_path, alpha):
    name = "layers.0.attention.to_q"
    mod = dict(tiny_pipe.transformer.named_modules())[name]
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            f"transformer.{name}.lora_A.weight": torch.randn(4, mod.in_features, generator=g),
            f"transformer.{name}.lora_B.weight": torch.randn(mod.out_features, 4, generator=g),
            f"transformer.{name}.alpha": torch.tensor(alpha, dtype=torch.float64),
        },
        tmp_path / "big.safetensors",
    )
    cfg = ServerConfig(lora_resolver=LoraStore(tmp_path))
    e = _refused(tiny_pipe, image_request(steps=2, width=128, height=128, lora=[{"model": "big"}]), cfg)
    assert e.field == "lora[0].model" and "alpha" in e.message


def test_a_sane_lora_is_still_accepted(tiny_pipe, tmp_path):
    name = "layers.0.attention.to_q"
    mod = dict(tiny_pipe.transformer.named_modules())[name]
    save_file(
        {
            f"transformer.{name}.lora_A.weight": torch.full((4, mod.in_features), 0.01),
            f"transformer.{name}.lora_B.weight": torch.full((mod.out_features, 4), 0.01),
            f"transformer.{name}.alpha": torch.tensor(4.0),
        },
        tmp_path / "ok.safetensors",
    )
    cfg = ServerConfig(lora_resolver=LoraStore(tmp_path))
    out = tiny_pipe.infer(image_request(steps=2, width=128, height=128, seed=5, lora=[{"model": "ok"}]), cfg)
    assert out[0]["seed"] == 5


def test_cache_window_end_rounding_to_step_zero_names_the_end(tiny_pipe):
    # steps 4: 10 % of 4 = 0.4 -> step 0; the start (0 %) is fine, the end is what is wrong
    accel = {"fbCache": True, "cacheStartStepPercentage": 0, "cacheEndStepPercentage": 10}
    e = _refused(tiny_pipe, image_request(steps=4, acceleratorOptions=accel))
    assert e.field == "acceleratorOptions.cacheEndStepPercentage"
    assert "step 0" in e.message
    # a start past a (non-zero) end still names the start, as before
    accel = {"fbCache": True, "cacheStartStepPercentage": 60, "cacheEndStepPercentage": 50}
    assert _refused(tiny_pipe, image_request(steps=4, acceleratorOptions=accel)).field == (
        "acceleratorOptions.cacheStartStepPercentage"
    )


def test_controlnet_window_end_rounding_to_step_zero_names_the_end():
    from zimage_core.service.request import resolve_window

    with pytest.raises(RequestError) as e:
        resolve_window({"startStepPercentage": 0, "endStepPercentage": 20}, "", 4, "controlNet[0].")
    assert e.value.field == "controlNet[0].endStepPercentage"
    assert resolve_window({"startStepPercentage": 0, "endStepPercentage": 25}, "", 4, "controlNet[0].") == (0, 1)


@pytest.mark.parametrize("key", ["positivePrompt", "negativePrompt"])
def test_one_character_ultralytics_prompt_is_refused_like_the_main_prompt(tiny_pipe, key):
    cfg = ServerConfig(face_detector=lambda image: [])
    e = _refused(tiny_pipe, image_request(ultralytics={key: "a"}), cfg)
    assert e.field == f"ultralytics.{key}" and "[2, 3000]" in e.message
    e = _refused(tiny_pipe, image_request(positivePrompt="a"), cfg)  # the main prompt's rule, for reference
    assert e.field == "positivePrompt" and "[2, 3000]" in e.message


def _wait(reg: TaskRegistry, task_uuid: str) -> dict:
    for _ in range(500):
        r = reg.get(task_uuid)
        if r["status"] != "processing":
            return r
        time.sleep(0.01)
    raise AssertionError("task did not finish")


UUIDS = [f"{i}b7f4c3e-8f0a-4d8e-9b1a-2f3c4d5e6f70" for i in range(5)]


def test_async_registry_is_bounded_in_bytes():
    reg = TaskRegistry(capacity=100, max_bytes=10_000)
    for u in UUIDS[:3]:
        reg.submit(u, None, lambda: [{"imageBase64Data": "x" * 4000}])
        assert _wait(reg, u)["status"] == "success"
    # 3 x 4000 bytes of image text does not fit in 10 000: the oldest finished result is evicted for the newest
    assert UUIDS[0] not in reg and UUIDS[1] in reg and UUIDS[2] in reg
    assert reg.bytes <= 10_000


def test_async_result_larger_than_the_budget_is_an_error_not_held():
    reg = TaskRegistry(capacity=100, max_bytes=1_000)
    reg.submit(UUIDS[3], None, lambda: [{"imageBase64Data": "x" * 5000}])
    r = _wait(reg, UUIDS[3])
    assert r["status"] == "error" and r["error"]["field"] == "numberResults"
    assert reg.bytes <= 1_000


def test_async_registry_bytes_return_to_zero_on_expiry():
    reg = TaskRegistry(capacity=100, ttl_s=0.05, max_bytes=10_000)
    reg.submit(UUIDS[4], None, lambda: [{"imageBase64Data": "x" * 4000}])
    _wait(reg, UUIDS[4])
    assert reg.bytes > 4000
    time.sleep(0.1)
    with pytest.raises(RequestError):  # get() evicts the expired result
        reg.get(UUIDS[4])
    assert reg.bytes == 0
