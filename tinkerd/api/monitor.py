"""Monitoring routes: `/metrics` (Prometheus text), the system's status, each run's events.

The blueprint also times every request of the app (before/after_app_request), labelled by the
route's rule (`/api/v1/training_runs/<run_id>`), never the raw path. Counters live in the app's
`MonitorStore` (`tinkerd.metrics`): in process, or cluster-wide in Redis.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from tinkerd.api import caller, registry, service
from tinkerd.metrics import host_stats, observation, render, series
from tinkerd.types import UserError

log = logging.getLogger(__name__)

bp = Blueprint("monitor", __name__)

MAX_PAGE = 1000


@bp.before_app_request
def _start_timer() -> None:
    g.tinkerd_started = time.perf_counter()


@bp.after_app_request
def _count_request(response: Response) -> Response:
    try:
        started = g.pop("tinkerd_started", None)
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        status = response.status_code
        increments = {
            series(
                "tinkerd_http_requests_total", route=route, method=request.method, status=status
            ): 1.0
        }
        if started is not None:
            elapsed = time.perf_counter() - started
            increments.update(
                observation(
                    "tinkerd_http_request_duration_seconds",
                    elapsed,
                    route=route,
                    method=request.method,
                )
            )
        if status >= 400:
            body = response.get_json(silent=True) if response.is_json else None
            category = body.get("category") if isinstance(body, dict) else None
            category = category or ("user" if status < 500 else "server")
            errors = series(
                "tinkerd_http_errors_total", route=route, status=status, category=category
            )
            increments[errors] = 1.0
        service().monitor.add(increments)
    except Exception:  # noqa: BLE001 - counting must never break a response
        log.debug("could not count a request", exc_info=True)
    return response


# -- /metrics ---------------------------------------------------------------------------------


def _by_worker(counters: dict[str, float], name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for key, value in counters.items():
        try:
            metric, labels = json.loads(key)
        except ValueError:
            continue
        if metric == name:
            worker = dict(labels).get("worker", "")
            totals[worker] = totals.get(worker, 0.0) + value
    return totals


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition: counters (cluster-wide when scaled out) and gauges read now:
    queue depth, workers with their memory and models, tokens per second while busy."""
    svc = service()
    monitor = svc.monitor
    counters = monitor.counters()
    workers = monitor.workers()
    depth = svc.scheduler.queue_depth()
    gauges: list[tuple[str, str, dict[str, Any], float]] = [
        ("tinkerd_queue_depth", "requests queued or running on all workers", {}, depth),
        ("tinkerd_workers", "live workers", {}, len(workers)),
        ("tinkerd_lost_models", "models lost with their workers", {}, len(monitor.lost_models())),
    ]
    for name, info in workers.items():
        who = {"worker": name}
        device = {"worker": name, "device": info.get("device", "")}
        gauges += [
            ("tinkerd_worker_queue_depth", "requests queued or running on a worker", who,
             info.get("queue_depth", 0)),
            ("tinkerd_worker_models", "training models a worker holds", who,
             len(info.get("models", ()))),
            ("tinkerd_worker_memory_total_bytes", "a worker's device memory (host RAM on CPU)",
             device, info.get("memory_total", 0)),
            ("tinkerd_worker_memory_free_bytes", "free memory of a worker's device", device,
             info.get("memory_free", 0)),
        ]  # fmt: skip
        optional = (
            ("memory_allocated", "tinkerd_worker_gpu_memory_allocated_bytes", "torch's tensors"),
            ("memory_reserved", "tinkerd_worker_gpu_memory_reserved_bytes", "torch's cache"),
            ("gpu_utilization", "tinkerd_worker_gpu_utilization_percent", "NVML utilisation"),
        )
        for field, metric, help_ in optional:
            if field in info:
                gauges.append((metric, help_, device, info[field]))
    tokens = _by_worker(counters, "tinkerd_forward_backward_tokens_total")
    seconds = _by_worker(counters, "tinkerd_forward_backward_seconds_total")
    for worker, busy in seconds.items():
        if busy > 0:
            gauges.append(
                (
                    "tinkerd_forward_backward_tokens_per_second",
                    "tokens per second of forward(_backward) while busy, since start "
                    "(rate(tinkerd_forward_backward_tokens_total) for recent throughput)",
                    {"worker": worker},
                    tokens.get(worker, 0.0) / busy,
                )
            )
    return Response(
        render(counters, gauges), content_type="text/plain; version=0.0.4; charset=utf-8"
    )


# -- system status ----------------------------------------------------------------------------


@bp.get("/api/v1/system/status")
def system_status():
    """Workers with their devices, memory (and GPU utilisation where NVML is present), models
    and queue; this API host's CPUs, load and RAM; the total queue depth; lost models."""
    svc = service()
    mine = None if caller().admin else {r.model_id for r in registry().runs()}
    workers = []
    for name, info in sorted(svc.monitor.workers().items()):
        held = info.get("models", [])
        if mine is not None:  # load is everyone's to see; model ids only the owner's
            info = {**info, "models": [m for m in held if m in mine]}
        workers.append({**info, "name": name, "models_held": len(held)})
    lost = {k: v for k, v in svc.monitor.lost_models().items() if mine is None or k in mine}
    return jsonify(
        {
            "mode": svc.monitor.mode,
            "workers": workers,
            "queue_depth": svc.scheduler.queue_depth(),
            "host": host_stats(),
            "models": len(registry().models()),
            "lost_models": [{"model_id": k, "reason": v} for k, v in sorted(lost.items())],
        }
    )


# -- a training run's events and log ----------------------------------------------------------


def _events(run_id: str) -> tuple[list[dict[str, Any]], int, int, int]:
    """The run's events after `since` (a Unix time) and of `type` (comma-separated), a page
    (`limit`, `offset`) of them; 404 for an unknown run."""
    svc = service()
    registry().run(run_id)
    events = svc.monitor.events(run_id)
    args = request.args
    try:
        limit = int(args.get("limit", 100))
        offset = int(args.get("offset", 0))
        since = float(args["since"]) if "since" in args else None
    except ValueError:
        raise UserError("limit and offset must be integers and since a number") from None
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise UserError(f"limit must be in [1, {MAX_PAGE}] and offset not negative")
    if since is not None:
        events = [e for e in events if e.get("time", 0) > since]
    if args.get("type"):
        wanted = set(args["type"].split(","))
        events = [e for e in events if e.get("type") in wanted]
    return events[offset : offset + limit], offset, limit, len(events)


@bp.get("/api/v1/training_runs/<run_id>/events")
def run_events(run_id: str):
    """The run's events, oldest first: created, each forward(_backward) with its loss and
    tokens, each optim_step, saves, loads, errors, removal. The newest `metrics.MAX_EVENTS`
    are kept; page with limit/offset, or poll with `since` = the last event's time."""
    page, offset, limit, total = _events(run_id)
    return jsonify(
        {
            "training_run_id": run_id,
            "events": page,
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }
    )


@bp.get("/api/v1/training_runs/<run_id>/log")
def run_log(run_id: str):
    """The same events as text, a line each (`tail`-able in a terminal)."""
    page, *_ = _events(run_id)
    return Response("".join(_log_line(e) + "\n" for e in page), content_type="text/plain")


def _log_line(event: dict[str, Any]) -> str:
    moment = datetime.fromtimestamp(event.get("time", 0), UTC).isoformat(timespec="milliseconds")
    rest = " ".join(
        f"{k}={_short(v)}"
        for k, v in event.items()
        if k not in ("time", "type", "metrics") and v is not None
    )
    return f"{moment} {event.get('type', '?')} {rest}".rstrip()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
