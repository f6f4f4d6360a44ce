"""Security properties: the loaders' refusals, the outbound-call policy (webhookURL / uploadEndpoint) and the async
task registry. Each test builds the hostile input itself and checks the refusal against the documented rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import CheckpointError, ZImageTransformer
from zimage_core.components import RANDOM_TRANSFORMER, build_random_pipeline
from zimage_core.config import PRESETS
from zimage_core.weights import save_transformer

# ---- loaders -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    return build_random_pipeline(tmp_path_factory.mktemp("sec") / "pipe", seed=0)


@pytest.fixture
def folder(pipe_folder, tmp_path):
    """A fresh copy of a small random pipeline folder, to be damaged by the test."""
    return shutil.copytree(pipe_folder, tmp_path / "pipe")


def _load_pipeline(path):
    from zimage_core.pipeline import ZImage

    return ZImage.from_pretrained(path, device="cpu", dtype=torch.float32)


def _within(seconds, fn, *args):
    """Run fn in a daemon thread; fail if it has not finished in time (a FIFO would block open() forever)."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("sub,weights", [("vae", "diffusion_pytorch_model"), ("text_encoder", "model")])
def test_pickle_weights_in_text_encoder_or_vae_refused(folder, sub, weights):
    """transformers/diffusers would unpickle a .bin (arbitrary code): the loader refuses it before they see it."""
    from safetensors.torch import load_file

    st = folder / sub / f"{weights}.safetensors"
    torch.save(load_file(st), folder / sub / f"{weights}.bin")
    st.unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        _load_pipeline(folder)


@pytest.mark.parametrize(
    "relpath", ["transformer/config.json", "model_index.json", "scheduler/scheduler_config.json", "zimage_fast.json"]
)
@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b'{"a": "\xff"}', b"[" * 100_000])
def test_malformed_json_is_a_checkpoint_error(folder, relpath, data):
    (folder / relpath).write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        _load_pipeline(folder)
    assert relpath.split("/")[-1] in str(e.value)


@pytest.mark.parametrize(
    "relpath,patch",
    [
        ("transformer/config.json", {"n_layers": "30"}),
        ("transformer/config.json", {"axes_dims": 5}),
        ("transformer/config.json", {"dim": None}),
        ("scheduler/scheduler_config.json", {"shift": "three"}),
        ("scheduler/scheduler_config.json", {"base_image_seq_len": 1e400}),
        ("zimage_fast.json", {"defaults": {"steps": 2, "nonsense": 1}}),
    ],
)
def test_wrongly_typed_config_values_are_checkpoint_errors(folder, relpath, patch):
    path = folder / relpath
    d = json.loads(path.read_text()) if path.exists() else {}
    d.update(patch)
    path.write_text(json.dumps(d).replace("Infinity", "1e400"))
    with pytest.raises(CheckpointError, match=relpath.split("/")[-1].replace(".", r"\.")):
        _load_pipeline(folder)


def _sharded(tmp_path):
    model = ZImageTransformer(PRESETS["tiny"])
    return save_transformer(model, tmp_path / "t", max_shard_bytes=30_000)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_index_shard_outside_the_folder_refused(tmp_path, kind):
    folder = _sharded(tmp_path)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / first, outside)  # the shard exists, but outside the checkpoint folder
    target = "../outside.safetensors" if kind == "dotdot" else str(outside)
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        ZImageTransformer.from_pretrained(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "config.json"])
def test_fifo_as_weights_or_config_refused_without_blocking(tmp_path, name):
    folder = tmp_path / "t"
    save_transformer(ZImageTransformer(PRESETS["tiny"]), folder)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    # in a child process: a blocked open() of a FIFO can hold the interpreter lock
    code = (
        "import sys\nfrom zimage_core import CheckpointError, ZImageTransformer\n"
        "try:\n    ZImageTransformer.from_pretrained(sys.argv[1])\n"
        "except CheckpointError as e:\n    print('REFUSED', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120, env=env
    )
    assert "REFUSED" in proc.stdout and "not a regular file" in proc.stdout, proc.stderr[-2000:]


def test_huge_layer_count_refused_before_building(tmp_path):
    """A config promising far more parameters than the files hold is refused from the header alone."""
    folder = tmp_path / "t"
    save_transformer(ZImageTransformer(PRESETS["tiny"]), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 3000}))
    with pytest.raises(CheckpointError, match="parameters"):
        _within(60, ZImageTransformer.from_pretrained, folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 1e7}))  # a float is not a layer count
    with pytest.raises(CheckpointError, match="n_layers"):
        _within(60, ZImageTransformer.from_pretrained, folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 10**7}))
    with pytest.raises(CheckpointError, match="parameters"):
        _within(60, ZImageTransformer.from_pretrained, folder)


def test_single_file_with_bad_metadata_config(tmp_path):
    model = ZImageTransformer(PRESETS["tiny"])
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "z.safetensors", metadata={"zimage_config": "{broken"})
    with pytest.raises(CheckpointError, match="metadata"):
        ZImageTransformer.from_pretrained(tmp_path / "z.safetensors")


def test_expected_parameter_count_matches_a_built_model():
    from zimage_core.model import count_parameters, expected_parameters

    for cfg in (PRESETS["tiny"], RANDOM_TRANSFORMER, PRESETS["tiny"].replace(n_layers=5, n_refiner_layers=0)):
        assert expected_parameters(cfg) == count_parameters(ZImageTransformer(cfg))
    # the released model's figure, as published in the config's comment
    assert expected_parameters(PRESETS["z-image"]) == 6_154_908_736


# ---- outbound calls (webhookURL / uploadEndpoint) ------------------------------------------------------------------


class _Server:
    """A loopback TCP server whose handler gets the raw connection (to trickle, hang, redirect or fail)."""

    def __init__(self, handler):
        import socketserver

        self.hits = 0

        class H(socketserver.BaseRequestHandler):
            def handle(inner):
                self.hits += 1
                inner.request.settimeout(5)
                try:
                    inner.request.recv(65536)
                    handler(inner.request)
                except OSError:
                    pass

        class S(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = S(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def make(handler):
        servers.append(_Server(handler))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _local_policy(**kw):
    from zimage_core.service.netpolicy import OutboundPolicy

    return OutboundPolicy(enabled=True, allow_private=True, ports=(), **kw)


def test_outbound_calls_are_off_by_default():
    from zimage_core import RequestError
    from zimage_core.service.netpolicy import OutboundPolicy, check_target

    with pytest.raises(RequestError) as e:
        check_target("https://example.com/hook", "webhookURL", OutboundPolicy())
    assert e.value.field == "webhookURL" and "disabled" in e.value.message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://localhost/x",
        "http://[::1]/x",
        "http://10.1.2.3/x",
        "http://192.168.0.1/x",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata
        "http://0.0.0.0/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://100.64.0.1/x",
    ],
)
def test_non_public_targets_refused_after_resolution(url):
    from zimage_core import RequestError
    from zimage_core.service.netpolicy import OutboundPolicy, check_target

    with pytest.raises(RequestError, match="non-public") as e:
        check_target(url, "uploadEndpoint", OutboundPolicy(enabled=True))
    assert e.value.field == "uploadEndpoint"


def test_port_and_credentials_refused_before_any_lookup(monkeypatch):
    import socket as socket_mod

    from zimage_core import RequestError
    from zimage_core.service.netpolicy import OutboundPolicy, check_target

    monkeypatch.setattr(socket_mod, "getaddrinfo", lambda *a, **k: pytest.fail("resolved"))
    for url in ("http://8.8.8.8:22/x", "http://user:pw@8.8.8.8/x", "ftp://8.8.8.8/x"):
        with pytest.raises(RequestError):
            check_target(url, "webhookURL", OutboundPolicy(enabled=True))


def test_connection_goes_to_the_checked_address(monkeypatch):
    """The name is resolved once; the socket connects to that checked address, not to a second lookup."""
    import socket as socket_mod

    from zimage_core.service import netpolicy

    answers = iter([[(2, 1, 6, "", ("93.184.216.34", 80))], [(2, 1, 6, "", ("127.0.0.1", 80))]])
    monkeypatch.setattr(socket_mod, "getaddrinfo", lambda *a, **k: next(answers))
    seen = []

    def connect(addr, timeout=None):
        seen.append(addr)
        raise OSError("stop here")

    monkeypatch.setattr(socket_mod, "create_connection", connect)
    policy = netpolicy.OutboundPolicy(enabled=True)
    assert not netpolicy.deliver("POST", "http://rebind.test/x", b"{}", "application/json", "webhookURL", policy,
                                 policy.deadline())  # fmt: skip
    assert seen == [("93.184.216.34", 80)]


def test_redirects_are_not_followed(serve):
    from zimage_core.service.netpolicy import deliver

    target = serve(lambda s: s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    redirect = serve(lambda s: s.sendall(f"HTTP/1.1 307 Moved\r\nLocation: {target.url}\r\n\r\n".encode()))
    policy = _local_policy()
    assert not deliver("PUT", redirect.url, b"img", "image/png", "uploadEndpoint", policy, policy.deadline())
    assert redirect.hits == 1 and target.hits == 0
    assert deliver("PUT", target.url, b"img", "image/png", "uploadEndpoint", policy, policy.deadline())


def test_trickling_endpoint_is_cut_at_the_total_deadline(serve):
    import time

    from zimage_core.service.netpolicy import deliver

    def trickle(sock):
        for ch in b"HTTP/1.1 200 OK\r\n":
            sock.sendall(bytes([ch]) if ch != 13 else b"x")  # never completes the status line
            time.sleep(0.2)

    server = serve(trickle)
    policy = _local_policy(deadline_s=1.0)
    t0 = time.monotonic()
    assert not deliver("POST", server.url, b"{}", "application/json", "webhookURL", policy, policy.deadline())
    assert time.monotonic() - t0 < 2.0


def test_one_deadline_for_all_calls_of_a_request(serve):
    """Five webhooks to a hanging endpoint cost one deadline in total, not five timeouts."""
    import time

    from zimage_core.service.netpolicy import deliver

    server = serve(lambda s: time.sleep(4))
    policy = _local_policy(deadline_s=1.0)
    deadline = policy.deadline()
    t0 = time.monotonic()
    results = [deliver("POST", server.url, b"{}", "application/json", "webhookURL", policy, deadline) for _ in range(5)]
    assert results == [False] * 5
    assert time.monotonic() - t0 < 2.0


def test_remote_error_text_never_reaches_the_caller(serve, caplog):
    from zimage_core.service.netpolicy import OutboundError, send

    server = serve(lambda s: s.sendall(b"HTTP/1.1 500 Internal\r\nContent-Length: 14\r\n\r\nSECRET-BANNER!"))
    policy = _local_policy()
    with pytest.raises(OutboundError) as e:
        send("PUT", server.url, b"x", "image/png", "uploadEndpoint", policy, policy.deadline())
    assert "SECRET" not in str(e.value) and e.value.reason == "HTTP 500"


# ---- the async task registry ---------------------------------------------------------------------------------------


def _wait_for(registry, task, owner=None, seconds=10.0):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        state = registry.get(task, owner)
        if state["status"] != "processing":
            return state
        time.sleep(0.01)
    raise AssertionError("task did not finish")


def test_reused_task_uuid_is_refused_not_overwritten():
    from zimage_core import RequestError
    from zimage_core.service.taskregistry import TaskRegistry

    reg = TaskRegistry()
    task = "0b7f4c3e-8f0a-4d8e-9b1a-2f3c4d5e6f70"
    reg.submit(task, None, lambda: ["first"])
    assert _wait_for(reg, task)["data"] == ["first"]
    with pytest.raises(RequestError) as e:
        reg.submit(task.upper(), None, lambda: ["second"])
    assert e.value.field == "taskUUID"
    assert reg.get(task)["data"] == ["first"]


def test_tasks_are_owner_bound():
    from zimage_core import RequestError
    from zimage_core.service.taskregistry import TaskRegistry

    reg = TaskRegistry()
    task = "1b7f4c3e-8f0a-4d8e-9b1a-2f3c4d5e6f70"
    reg.submit(task, "alice", lambda: ["alice's image"])
    assert _wait_for(reg, task, "alice")["data"] == ["alice's image"]
    for other in ("mallory", None):
        with pytest.raises(RequestError, match="not yours"):
            reg.get(task, other)


def test_finished_tasks_expire():
    import time

    from zimage_core import RequestError
    from zimage_core.service.taskregistry import TaskRegistry

    reg = TaskRegistry(ttl_s=0.2)
    task = "2b7f4c3e-8f0a-4d8e-9b1a-2f3c4d5e6f70"
    reg.submit(task, None, lambda: [])
    _wait_for(reg, task)
    time.sleep(0.3)
    with pytest.raises(RequestError):
        reg.get(task)
    assert len(reg) == 0


def test_registry_is_bounded_and_runs_on_a_fixed_pool():
    from zimage_core import RequestError
    from zimage_core.service.taskregistry import TaskRegistry

    release = threading.Event()
    reg = TaskRegistry(capacity=4, workers=2)
    before = threading.active_count()
    uuids = [f"{i:08x}-8f0a-4d8e-9b1a-2f3c4d5e6f70" for i in range(5)]
    for u in uuids[:4]:
        reg.submit(u, None, lambda: release.wait(10) and [])
    assert threading.active_count() - before <= 2
    with pytest.raises(RequestError) as e:
        reg.submit(uuids[4], None, lambda: [])
    assert e.value.field == "deliveryMethod"
    release.set()
    assert all(_wait_for(reg, u)["status"] == "success" for u in uuids[:4])


def test_failed_task_reports_no_internal_text():
    from zimage_core.service.taskregistry import TaskRegistry

    reg = TaskRegistry()
    task = "3b7f4c3e-8f0a-4d8e-9b1a-2f3c4d5e6f70"

    def boom():
        raise RuntimeError("/secret/path/model.safetensors exploded")

    reg.submit(task, None, boom)
    state = _wait_for(reg, task)
    assert state["status"] == "error" and "secret" not in json.dumps(state)
