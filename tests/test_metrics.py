"""The metrics module on its own: every series parses with Prometheus' text parser and moves as the API is called;
several replicas' expositions merge into one valid exposition."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from zimage_core.server.metrics import Metrics, merge_exposition  # noqa: E402


def samples(text: bytes | str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the text format, read by prometheus_client's parser."""
    text = text.decode() if isinstance(text, bytes) else text
    out = {}
    names = []
    for fam in text_string_to_metric_families(text):
        names.append(fam.name)
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert len(names) == len(set(names)), f"a metric family appears twice: {names}"
    return out


def test_series_move_and_parse():
    m = Metrics(replica="r1")
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    s0 = samples(body)
    r = (("replica", "r1"),)
    assert s0[("zimage_queue_depth", r)] == 0
    assert s0[("zimage_images_total", r)] == 0
    assert s0[("zimage_step_seconds_count", r)] == 0

    m.set_queue_depth(3)
    m.task_started()
    m.task_started()
    m.task_stopped()
    m.task_finished("imageInference", "success", seconds=0.7)
    m.task_finished("imageInference", "error", code="timeout", seconds=400.0)
    m.task_stopped()
    m.task_finished("imageInference", "error", code="serverBusy")
    timer = m.step_timer()
    for i in range(4):  # 4 step ends of one result -> 3 intervals
        timer.step(i)
    for i in range(2):  # a second result (index restarts) -> 1 more interval
        timer.step(i)
    m.images_generated(2)
    s = samples(m.render()[0])

    assert s[("zimage_queue_depth", r)] == 3
    assert s[("zimage_tasks_in_progress", r)] == 0
    assert s[("zimage_tasks_started_total", (("replica", "r1"), ("task_type", "imageInference")))] == 2
    ok = (("code", ""), ("outcome", "success"), ("replica", "r1"), ("task_type", "imageInference"))
    timeout = (("code", "timeout"), ("outcome", "error"), ("replica", "r1"), ("task_type", "imageInference"))
    busy = (("code", "serverBusy"), ("outcome", "error"), ("replica", "r1"), ("task_type", "imageInference"))
    assert s[("zimage_tasks_total", ok)] == 1
    assert s[("zimage_tasks_total", timeout)] == 1
    assert s[("zimage_tasks_total", busy)] == 1
    lat = (("replica", "r1"), ("task_type", "imageInference"))
    assert s[("zimage_request_seconds_count", lat)] == 2
    assert s[("zimage_request_seconds_sum", lat)] == pytest.approx(400.7)
    # 0.7 s falls in the 1.0 bucket, 400 s only in 600 and +Inf
    assert s[("zimage_request_seconds_bucket", (("le", "0.5"), *lat))] == 0
    assert s[("zimage_request_seconds_bucket", (("le", "1.0"), *lat))] == 1
    assert s[("zimage_request_seconds_bucket", (("le", "300.0"), *lat))] == 1
    assert s[("zimage_request_seconds_bucket", (("le", "+Inf"), *lat))] == 2
    assert s[("zimage_step_seconds_count", r)] == 4
    assert s[("zimage_images_total", r)] == 2
    assert s[("zimage_images_per_second", r)] == pytest.approx(2 / 60.0)


def test_images_per_second_window():
    m = Metrics(window_s=10.0)
    m.images_generated(5, now=100.0)
    m.images_generated(3, now=105.0)
    assert m._images_per_second(now=106.0) == pytest.approx(0.8)
    assert m._images_per_second(now=112.0) == pytest.approx(0.3)  # the first batch left the window
    assert m._images_per_second(now=200.0) == 0.0


def test_outcome_is_checked():
    with pytest.raises(ValueError, match="outcome"):
        Metrics().task_finished("imageInference", "fine")


def test_two_apps_in_one_process_do_not_share_counters():
    a, b = Metrics(), Metrics()
    a.images_generated(4)
    assert samples(b.render()[0])[("zimage_images_total", (("replica", "0"),))] == 0


def test_merge_replicas_into_one_exposition():
    a, b = Metrics(replica="a"), Metrics(replica="b")
    a.images_generated(1)
    b.images_generated(2)
    b.task_finished("imageInference", "success", seconds=1.5)
    merged = samples(merge_exposition([a.render()[0].decode(), b.render()[0].decode()]))
    assert merged[("zimage_images_total", (("replica", "a"),))] == 1
    assert merged[("zimage_images_total", (("replica", "b"),))] == 2
    lat = (("replica", "b"), ("task_type", "imageInference"))
    assert merged[("zimage_request_seconds_count", lat)] == 1
    assert merged[("zimage_request_seconds_bucket", (("le", "2.5"), *lat))] == 1


def test_ray_hub_result_store_without_ray(monkeypatch):
    """The shared store behind cross-replica getResponse (a plain class; Ray only hosts it): pending, then the
    items; keyed by owner and case-insensitive taskUUID; bounded; finished entries expire."""
    from zimage_core.server import ray_app

    clock = [1000.0]
    monkeypatch.setattr(ray_app.time, "monotonic", lambda: clock[0])
    hub = ray_app.Hub(max_results=2, ttl_s=60.0)
    hub.put_result("alice", "AAAA", None, None)
    assert hub.get_result("alice", "aaaa") == (None, None)  # accepted, still running elsewhere
    hub.put_result("alice", "aaaa", [{"imageUUID": "x"}], None)
    assert hub.get_result("alice", "AAAA") == ([{"imageUUID": "x"}], None)
    assert hub.get_result("bob", "aaaa") is None  # another key never sees it
    hub.put_result("alice", "b", [], {"code": "timeout", "message": "m"})
    hub.put_result("alice", "c", [], None)  # capacity 2: the oldest entry goes
    assert hub.get_result("alice", "aaaa") is None and hub.get_result("alice", "b")[1]["code"] == "timeout"
    clock[0] += 61.0
    assert hub.get_result("alice", "c") is None  # expired
    hub.put_metrics("0", "text0")
    hub.put_metrics("1", "text1")
    hub.drop_metrics("1")
    assert hub.metrics() == {"0": "text0"}
