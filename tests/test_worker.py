"""Unit tests of tinkerd.worker on a real tiny model: the order in which a contended worker runs
the requests of keys of different priority, and each key's pending count as requests run, fail
and are drained."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tinkerd import tasks
from tinkerd.hf_backend import HFBackend
from tinkerd.tasks import Result, Scheduler
from tinkerd.types import (
    AdamParams,
    CreateModel,
    Datum,
    ForwardBackward,
    LoraConfig,
    OptimStep,
    Payload,
    Rejected,
    Sample,
    SamplerWeights,
    SamplingParams,
)
from tinkerd.wire import make_forward_backward
from tinkerd.worker import Worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    return HFBackend(tmp_path_factory.mktemp("data"), "cpu")


class Lab:
    """A scheduler and a worker over the shared backend, with the order results settled in."""

    def __init__(self, backend: HFBackend, base_model: str) -> None:
        self.base_model = base_model
        self.scheduler = Scheduler()
        self.worker = Worker(self.scheduler, backend, sample_gather_gap=0.0)
        self.settled: list[str] = []
        self.created: list[str] = []
        self.labels: dict[str, str] = {}
        settle = self.scheduler.settle

        def recording(request_id: str, result: Result, tenant: str = "") -> None:
            self.settled.append(self.labels.get(request_id, request_id))
            settle(request_id, result, tenant)

        self.scheduler.settle = recording  # type: ignore[method-assign]

    def create(self, model_id: str, tenant: str, priority: int) -> None:
        self.scheduler.open_model(model_id)
        create = CreateModel(self.base_model, LoraConfig(rank=4, seed=0))
        created = self.submit(model_id, 0, create, tenant, priority)
        self.run()
        assert json.loads(self.scheduler.wait(created, 0).body)["model_id"] == model_id
        self.created.append(model_id)
        self.settled.clear()

    def submit(
        self, model_id: str, seq_id: int, payload: Payload, tenant: str, priority: int
    ) -> str:
        request_id = self.scheduler.submit(
            model_id, seq_id, payload, f"fp{seq_id}", tenant=tenant, priority=priority
        )
        self.labels[request_id] = f"{model_id}:{seq_id}"
        return request_id

    def steps(self, model_id: str, first_seq: int, count: int, tenant: str, priority: int) -> None:
        """`count` training steps: two forward_backwards, then an optim_step."""
        seq = first_seq
        for _ in range(count):
            for payload in (forward_backward(), forward_backward(), optim()):
                self.submit(model_id, seq, payload, tenant, priority)
                seq += 1

    def run(self) -> None:
        """Cycles until nothing is left to run."""
        while self.worker.run_cycle(timeout=0.0):
            pass


@pytest.fixture
def lab(backend: HFBackend, tiny_model_dir: Path) -> Iterator[Lab]:
    made = Lab(backend, str(tiny_model_dir))
    yield made
    for model_id in made.created:  # the next test makes its own of the same name
        backend.remove_model(model_id)


def forward_backward() -> ForwardBackward:
    tokens = np.array([5, 17, 42, 99], dtype=np.int64)
    inputs = {"target_tokens": np.array([17, 42, 99, 7], dtype=np.int64),
              "weights": np.ones(4, dtype=np.float32)}  # fmt: skip
    return make_forward_backward([Datum(tokens, inputs)], "cross_entropy", {}, False)


def optim() -> OptimStep:
    return OptimStep(AdamParams(learning_rate=1e-3))


def spy(monkeypatch: pytest.MonkeyPatch, backend: HFBackend, name: str, note: Callable) -> None:
    """Call `note(requests)` before each call of the backend's `name` method."""
    real = getattr(backend, name)

    def spied(requests: list) -> list:
        note(requests)
        return real(requests)

    monkeypatch.setattr(backend, name, spied)


# -- priority --------------------------------------------------------------------------------


def test_the_higher_priority_models_steps_run_first(
    lab: Lab, backend: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "AGING_SECONDS", 1000.0)  # no aging within the test
    lab.create("low", "lo", priority=0)
    lab.create("high", "hi", priority=7)
    batches: list[int] = []
    spy(monkeypatch, backend, "forward_backward", lambda requests: batches.append(len(requests)))
    lab.steps("low", 1, 2, "lo", priority=0)  # the low key's work queued first
    lab.steps("high", 1, 2, "hi", priority=7)
    lab.run()
    assert lab.settled == [f"high:{s}" for s in range(1, 7)] + [f"low:{s}" for s in range(1, 7)]
    assert batches == [2, 2, 2, 2]  # a step's forward_backwards still go to the backend together


def test_a_long_waiting_low_priority_request_runs_before_fresh_high_priority_work(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "AGING_SECONDS", 0.05)
    lab.create("low", "lo", priority=0)
    lab.create("high", "hi", priority=7)
    lab.steps("low", 1, 1, "lo", priority=0)
    time.sleep(0.5)  # 10 levels of aging: above priority 7
    lab.steps("high", 1, 2, "hi", priority=7)
    lab.run()
    assert lab.settled == ["low:1", "low:2", "low:3"] + [f"high:{s}" for s in range(1, 7)]


def test_samples_waiting_together_run_in_one_pass_highest_priority_first(
    lab: Lab, backend: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "AGING_SECONDS", 1000.0)
    passes: list[list[int]] = []
    spy(monkeypatch, backend, "sample", lambda reqs: passes.append([r.num_samples for r in reqs]))
    weights, prompt = SamplerWeights(lab.base_model), np.array([1, 2, 3], dtype=np.int64)
    for n, priority in ((1, 0), (2, 3), (3, 9), (4, 3)):  # num_samples tells them apart
        sample = Sample(weights, prompt, n, SamplingParams(max_tokens=2))
        lab.scheduler.submit_unordered("s:sample:0", n, sample, f"fp{n}", priority=priority)
    lab.run()
    assert passes == [[3, 2, 4, 1]]
    assert lab.scheduler.pending("") == 0


# -- pending per tenant ----------------------------------------------------------------------


def test_pending_counts_queued_and_running_requests_until_they_settle(
    lab: Lab, backend: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab.create("m", "a", priority=0)
    assert lab.scheduler.pending("a") == 0
    seen_running: list[int] = []
    count = lab.scheduler.pending
    spy(monkeypatch, backend, "forward_backward", lambda _: seen_running.append(count("a")))
    lab.steps("m", 1, 1, "a", priority=0)
    rejected = lab.submit("m", 4, Rejected({"error": "bad", "category": "user"}), "a", 0)
    waiting = lab.submit("m", 6, optim(), "a", 0)  # seq 5 never comes
    lab.submit("m", 1, forward_backward(), "b", 0)  # a retry: counted once, as the first's
    assert (lab.scheduler.pending("a"), lab.scheduler.pending("b")) == (5, 0)
    lab.run()
    assert seen_running == [5]  # the step's forward_backwards count while they run
    assert json.loads(lab.scheduler.wait(rejected, 0).body)["error"] == "bad"
    assert lab.scheduler.pending("a") == 1  # the one waiting for seq 5
    assert lab.worker.drain(timeout=1.0) == [waiting]
    assert lab.scheduler.pending("a") == 0
    assert json.loads(lab.scheduler.wait(waiting, 0).body)["category"] == "server"


def test_a_failed_request_is_no_longer_pending(lab: Lab) -> None:
    lab.create("m", "a", priority=0)
    tokens = np.array([5, 10**6], dtype=np.int64)  # past the vocabulary: the backend refuses it
    inputs = {"target_tokens": tokens, "weights": np.ones(2, dtype=np.float32)}
    missing = lab.submit("m", 1, ForwardBackward([Datum(tokens, inputs)], "cross_entropy"), "a", 0)
    lab.scheduler.open_model("never-created")
    lost = lab.submit("never-created", 1, optim(), "a", 0)
    lab.submit("never-created", 0, Rejected({"error": "no", "category": "user"}), "a", 0)
    assert lab.scheduler.pending("a") == 3
    lab.run()
    assert lab.scheduler.pending("a") == 0
    for request_id in (missing, lost):
        assert "error" in json.loads(lab.scheduler.wait(request_id, 0).body)


# -- failed creations ------------------------------------------------------------------------


@pytest.mark.parametrize("with_gradients", [False, True])
def test_only_a_new_models_failed_creation_is_forgotten(
    backend: HFBackend, tmp_path: Path, with_gradients: bool
) -> None:
    """A user's create that fails leaves nothing (the registry forgets it); a hand-over or a
    restore re-creates a model that exists, so its failure must not unlist the run."""
    scheduler = Scheduler()
    forgotten: list[str] = []
    worker = Worker(
        scheduler,
        backend,
        sample_gather_gap=0.0,
        on_create_failed=lambda model_id, error: forgotten.append(model_id),
    )
    scheduler.open_model("m")
    missing = str(tmp_path / "no-such-checkpoint")
    create = CreateModel(
        str(tmp_path / "no-such-base"), LoraConfig(rank=4, seed=0), from_checkpoint=missing,
        with_optimizer=with_gradients, with_gradients=with_gradients,
    )  # fmt: skip
    request_id = scheduler.submit("m", 0, create, "fp0")
    while worker.run_cycle(timeout=0.0):
        pass
    assert "error" in json.loads(scheduler.wait(request_id, 0).body)
    assert forgotten == ([] if with_gradients else ["m"])
