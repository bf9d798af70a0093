"""Monitoring on `tinkerd serve`: /metrics in Prometheus text (requests and latency by route,
steps, tokens, errors, queue depth, memory), the system status, and each run's events and log;
and the stores behind them, in process and in Redis."""

from __future__ import annotations

import time

import httpx
import pytest
from test_api_runs import DATA, SEQS  # the same three sequences
from tinker import types

from tinkerd.metrics import (
    MAX_EVENTS,
    LocalMonitor,
    RedisMonitor,
    observation,
    parse,
    render,
    series,
)

pytestmark = pytest.mark.timeout(180)

WAIT = 60
TOKENS_PER_STEP = sum(len(s) - 1 for s in SEQS)


def train(tc, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(DATA, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=0.02))
        losses.append(fb.result(timeout=WAIT).metrics["loss:sum"])
        opt.result(timeout=WAIT)
    return losses


def scrape(url: str) -> dict:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def value(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    want = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_metrics_count_requests_steps_tokens_and_queue(server, training_client) -> None:
    before = scrape(server.url)
    train(training_client, 3)
    sampler = training_client.save_weights_and_get_sampling_client().result(timeout=WAIT)
    prompt = types.ModelInput.from_ints([5, 17, 42])
    sampled = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=1)).result(WAIT)
    n_sampled = sum(len(s.tokens) for s in sampled.sequences)
    assert httpx.get(f"{server.url}/api/v1/training_runs/nope", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/no/such/route", timeout=10).status_code == 404
    after = scrape(server.url)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    fb = {"route": "/api/v1/forward_backward", "method": "POST", "status": 200}
    assert delta("tinkerd_http_requests_total", **fb) == 3
    assert delta("tinkerd_http_requests_total", route="/api/v1/optim_step") == 3
    assert delta("tinkerd_http_requests_total", route="/api/v1/retrieve_future") >= 6
    # the latency histogram: cumulative buckets, +Inf equal to the count
    poll = {"route": "/api/v1/retrieve_future", "method": "POST"}
    count = value(after, "tinkerd_http_request_duration_seconds_count", **poll)
    assert value(after, "tinkerd_http_request_duration_seconds_bucket", **poll, le="+Inf") == count
    small = value(after, "tinkerd_http_request_duration_seconds_bucket", **poll, le="0.1")
    assert 0 <= small <= count
    assert value(after, "tinkerd_http_request_duration_seconds_sum", **poll) > 0
    # errors by category; an unmatched path is one label, not one per path
    assert (
        delta(
            "tinkerd_http_errors_total",
            route="/api/v1/training_runs/<run_id>",
            status=404,
            category="user",
        )
        == 1
    )
    assert delta("tinkerd_http_requests_total", route="unmatched", status=404) == 1
    assert not any("/no/such/route" in str(labels) for _, labels in after)
    # what the worker did
    assert delta("tinkerd_optim_steps_total", worker="local") == 3
    assert delta("tinkerd_forward_backward_tokens_total", worker="local") == 3 * TOKENS_PER_STEP
    assert delta("tinkerd_tasks_total", worker="local", type="forward_backward") == 3
    assert delta("tinkerd_sampled_tokens_total", worker="local") == n_sampled > 0
    assert delta("tinkerd_samples_total", worker="local") == 2
    assert value(after, "tinkerd_forward_backward_tokens_per_second", worker="local") > 0
    # gauges
    # other tests on this shared server leave requests waiting for seq_ids they never send
    assert value(after, "tinkerd_queue_depth") == server.scheduler.queue_depth()
    assert ("tinkerd_worker_queue_depth", frozenset({("worker", "local")})) in after
    assert value(after, "tinkerd_workers") == 1
    assert value(after, "tinkerd_worker_memory_total_bytes", worker="local", device="cpu") > 0
    assert value(after, "tinkerd_worker_memory_free_bytes", worker="local") > 0
    assert value(after, "tinkerd_worker_models", worker="local") >= 1


def test_system_status_lists_the_local_worker(server, training_client) -> None:
    r = httpx.get(f"{server.url}/api/v1/system/status", timeout=30)
    assert r.status_code == 200
    status = r.json()
    assert status["mode"] == "embedded"
    [worker] = status["workers"]
    assert worker["name"] == "local" and worker["device"] == "cpu"
    assert worker["memory_total"] >= worker["memory_free"] > 0
    assert training_client.model_id in worker["models"]
    assert worker["models_held"] == len(worker["models"])
    assert isinstance(worker["queue_depth"], int)
    host = status["host"]
    assert host["cpu_count"] >= 1 and len(host["load_average"]) == 3
    assert host["memory_total"] >= host["memory_available"] > 0
    assert status["queue_depth"] == server.scheduler.queue_depth()
    assert status["lost_models"] == []


def test_run_events_in_order_with_losses_and_saves(server, training_client) -> None:
    tc, url = training_client, server.url
    losses = train(tc, 2)
    path = tc.save_state("ev-1").result(timeout=WAIT).path
    tc.load_state(path).result(timeout=WAIT)
    # a save that fails on the worker (the name is taken): an error event. The REST save takes
    # a seq_id the SDK client would also use next, so it is this run's last request.
    r = httpx.post(f"{url}/api/v1/training_runs/{tc.model_id}/save", json={"name": "ev-1"})
    failed = r.json()["request_id"]
    body = httpx.post(f"{url}/api/v1/retrieve_future", json={"request_id": failed}, timeout=30)
    assert body.json()["category"] == "user"

    r = httpx.get(f"{url}/api/v1/training_runs/{tc.model_id}/events", timeout=30)
    assert r.status_code == 200
    page = r.json()
    events = page["events"]
    assert page["training_run_id"] == tc.model_id
    assert page["cursor"] == {"offset": 0, "limit": 100, "total_count": len(events)}
    kinds = [e["type"] for e in events]
    assert kinds == [
        "created",
        "forward_backward",
        "optim_step",
        "forward_backward",
        "optim_step",
        "save_weights",
        "load_weights",
        "error",
    ]
    assert [e["seq_id"] for e in events] == sorted(e["seq_id"] for e in events)
    times = [e["time"] for e in events]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 60
    steps = [e for e in events if e["type"] == "forward_backward"]
    assert [e["loss"] for e in steps] == pytest.approx(losses)
    assert all(e["tokens"] == TOKENS_PER_STEP and e["datums"] == 3 for e in steps)
    assert events[0]["lora_rank"] == 8
    assert events[2]["learning_rate"] == pytest.approx(0.02)
    assert events[5]["path"] == path and events[6]["path"] == path
    assert events[7]["request"] == "save_weights" and events[7]["category"] == "user"

    # paging: limit/offset, since, type
    def get(**params) -> dict:
        r = httpx.get(f"{url}/api/v1/training_runs/{tc.model_id}/events", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    assert get(limit=2, offset=1)["events"] == events[1:3]
    assert get(since=events[4]["time"])["events"] == events[5:]
    only = get(type="optim_step,save_weights")["events"]
    assert [e["type"] for e in only] == ["optim_step", "optim_step", "save_weights"]
    log = httpx.get(f"{url}/api/v1/training_runs/{tc.model_id}/log").text.splitlines()
    assert len(log) == len(events) and " forward_backward " in log[1] and "loss=" in log[1]

    # an unknown run and bad paging: JSON errors
    r = httpx.get(f"{url}/api/v1/training_runs/no-such-run/events")
    assert r.status_code == 404 and r.json()["category"] == "user"
    assert "no-such-run" in r.json()["error"]
    r = httpx.get(f"{url}/api/v1/training_runs/{tc.model_id}/events", params={"limit": "x"})
    assert r.status_code == 400 and r.json()["category"] == "user"


# -- the stores --------------------------------------------------------------------------------


def test_render_is_prometheus_text_with_cumulative_buckets() -> None:
    monitor = LocalMonitor()
    for seconds in (0.003, 0.2, 0.2, 40.0):
        monitor.add(observation("tinkerd_http_request_duration_seconds", seconds, route="/x"))
    monitor.add({series("tinkerd_http_requests_total", route='/a"b\\c', status=200): 2})
    text = render(monitor.counters(), [("tinkerd_queue_depth", "depth", {}, 3)])
    assert "# TYPE tinkerd_http_request_duration_seconds histogram" in text
    assert "# TYPE tinkerd_queue_depth gauge" in text
    samples = parse(text)
    bucket = "tinkerd_http_request_duration_seconds_bucket"
    assert value(samples, bucket, le="0.005") == 1
    assert value(samples, bucket, le="0.25") == 3
    assert value(samples, bucket, le="30") == 3
    assert value(samples, bucket, le="+Inf") == 4
    assert value(samples, "tinkerd_http_request_duration_seconds_sum") == pytest.approx(40.403)
    assert 'route="/a\\"b\\\\c"' in text
    assert value(samples, "tinkerd_http_requests_total", route='/a"b\\c') == 2
    assert value(samples, "tinkerd_queue_depth") == 3


def test_redis_monitor_is_cluster_wide_and_caps_events(redis_url: str) -> None:
    from tinkerd.cluster.state import connect

    a, b = RedisMonitor(connect(redis_url)), RedisMonitor(connect(redis_url))
    key = series("tinkerd_optim_steps_total", worker="w1")
    a.add({key: 2})
    b.add({key: 3, series("tinkerd_forward_backward_seconds_total", worker="w1"): 0.25})
    b.flush()
    assert a.counters()[key] == 5  # a's own increments are sent before reading
    for i in range(MAX_EVENTS + 5):
        a.add_event("run-1", {"time": float(i), "type": "forward_backward", "seq_id": i})
    events = a.events("run-1")  # sent first
    assert b.events("run-1") == events
    assert (
        len(events) == MAX_EVENTS
        and events[0]["seq_id"] == 5
        and events[-1]["seq_id"] == (MAX_EVENTS + 4)
    )
    assert a.redis.ttl(RedisMonitor.events_key("run-1")) > 0
    assert b.events("other") == [] and b.workers() == {} and b.lost_models() == {}
    a.close()
    b.close()
