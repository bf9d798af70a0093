"""Unit tests of tinkerd.worker on a real tiny model: the order in which a contended worker runs
the requests of keys of different priority, and each key's pending count as requests run, fail
and are drained; and on a fake backend (tests/fake_backend.py), how a cycle batches the passes
and optimizer steps of several models."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_backend import FakeBackend

from tinkerd import sampling, tasks
from tinkerd.hf_backend import HFBackend
from tinkerd.results import Kind, Result
from tinkerd.tasks import Scheduler
from tinkerd.types import (
    AdamParams,
    CreateModel,
    Datum,
    ForwardBackward,
    LoraConfig,
    OptimStep,
    Payload,
    Rejected,
    RemoveModel,
    Sample,
    SamplerWeights,
    SamplingParams,
    SaveWeights,
)
from tinkerd.wire.decode import make_forward_backward
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
        assert self.scheduler.wait(created, 0).info()["model_id"] == model_id
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
        """Cycles (and sampling cycles) until nothing is left to run."""
        while True:
            ran = self.worker.run_cycle(timeout=0.0)
            sampling = self.worker.stream is not None and self.worker.sample_cycle(0.0)
            if not ran and not sampling:
                return


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


def test_samples_waiting_together_join_one_engine_step_highest_priority_first(
    lab: Lab, backend: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "AGING_SECONDS", 1000.0)
    started: list[int] = []
    real_start = backend.sample_start
    monkeypatch.setattr(
        backend,
        "sample_start",
        lambda r, done: started.append(r.num_samples) or real_start(r, done),
    )
    steps: list[list[int]] = []
    real_pass = sampling.Engine._pass

    def record(engine, model, routed, decoding, joining):
        steps.append([q.sample.num_samples for q in joining])
        return real_pass(engine, model, routed, decoding, joining)

    monkeypatch.setattr(sampling.Engine, "_pass", record)
    weights, prompt = SamplerWeights(lab.base_model), np.array([1, 2, 3], dtype=np.int64)
    for n, priority in ((1, 0), (2, 3), (3, 9), (4, 3)):  # num_samples tells them apart
        sample = Sample(weights, prompt, n, SamplingParams(max_tokens=2))
        lab.scheduler.submit_unordered("s:sample:0", n, sample, f"fp{n}", priority=priority)
    lab.run()
    assert started == [3, 2, 4, 1]
    assert steps[0] == [3, 2, 4, 1] and steps[1] == []  # all joined the first step
    assert lab.scheduler.pending("") == 0


def test_a_sample_never_waits_for_a_training_step(
    lab: Lab, backend: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the worker's threads running, samples (of the base, and of an earlier snapshot of
    the very model that trains) settle while a training step is held in the backend; the
    step's own order is untouched: its result comes after."""
    lab.create("busy", "a", priority=0)
    lab.submit("busy", 1, SaveWeights(None, snapshot_id="busy-0"), "a", 0)
    lab.run()
    entered, release = threading.Event(), threading.Event()
    real = backend.forward_backward

    def held(requests: list) -> list:
        entered.set()
        assert release.wait(60)
        return real(requests)

    monkeypatch.setattr(backend, "forward_backward", held)
    lab.worker.start()
    try:
        step = lab.submit("busy", 2, forward_backward(), "a", 0)
        assert entered.wait(30)
        prompt = np.array([1, 2, 3], dtype=np.int64)
        sampled = [
            lab.scheduler.submit_unordered(
                "s:sample:0", i, Sample(weights, prompt, 2, SamplingParams(max_tokens=4)), f"s{i}"
            )
            for i, weights in enumerate(
                [SamplerWeights(lab.base_model), SamplerWeights(lab.base_model, None, "busy-0")]
            )
        ]
        for request_id in sampled:
            result = lab.scheduler.wait(request_id, 30)
            assert result is not None and result.kind is Kind.SAMPLE
        assert lab.scheduler.wait(step, 0) is None  # the step is still held
    finally:
        release.set()
        lab.worker.stop()
    assert lab.scheduler.wait(step, 30) is not None


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
    assert lab.scheduler.wait(rejected, 0).value["error"] == "bad"
    assert lab.scheduler.pending("a") == 1  # the one waiting for seq 5
    assert lab.worker.drain(timeout=1.0) == [waiting]
    assert lab.scheduler.pending("a") == 0
    assert lab.scheduler.wait(waiting, 0).value["category"] == "server"


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
        assert lab.scheduler.wait(request_id, 0).kind is Kind.ERROR


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
    assert scheduler.wait(request_id, 0).kind is Kind.ERROR
    assert forgotten == ([] if with_gradients else ["m"])


# -- one batch per cycle, on a fake backend ----------------------------------------------------


@pytest.fixture
def fake_lab() -> Lab:
    return Lab(FakeBackend(), "fake/base")  # type: ignore[arg-type]


def settled_body(lab: Lab, request_id: str) -> Result:
    result = lab.scheduler.wait(request_id, 0)
    assert result is not None
    return result


def test_one_cycle_hands_every_models_passes_to_the_backend_in_one_call(fake_lab: Lab) -> None:
    fake: FakeBackend = fake_lab.worker.backend  # type: ignore[assignment]
    for model_id in ("a", "b", "c"):
        fake_lab.create(model_id, "t", priority=0)
    for model_id in ("a", "b", "c"):
        fake_lab.steps(model_id, 1, 1, "t", priority=0)  # fb, fb, optim_step
    fake.calls.clear()
    assert fake_lab.worker.run_cycle(timeout=0.0) == 9
    [batch] = fake.batches()
    assert sorted(batch) == ["a", "a", "b", "b", "c", "c"]  # all six passes in one call
    assert batch[::2] == batch[1::2]  # each model's two passes together, in seq order
    assert fake.batches("optim_steps") == [batch[::2]]  # one fused call, in the same order
    assert [name for name, _ in fake.calls] == ["forward_backward", "optim_steps"]
    assert fake_lab.scheduler.queue_depth() == 0 and fake_lab.scheduler.pending("t") == 0
    for model_id in ("a", "b", "c"):  # each stepped on its own 8 tokens
        assert fake.models[model_id].steps == 1 and fake.models[model_id].weight == 1 - 8e-3


def test_a_models_passes_after_its_barrier_wait_for_the_next_batch(fake_lab: Lab) -> None:
    fake: FakeBackend = fake_lab.worker.backend  # type: ignore[assignment]
    fake_lab.create("a", "t", priority=0)
    fake_lab.create("b", "t", priority=0)
    save = SaveWeights("tinker://a/weights/1")
    for seq, payload in enumerate([forward_backward(), save, forward_backward(), optim()], 1):
        fake_lab.submit("a", seq, payload, "t", 0)
    fake_lab.steps("b", 1, 1, "t", priority=0)
    fake.calls.clear()
    fake_lab.worker.run_cycle(timeout=0.0)
    calls = [(name, ids) for name, ids in fake.calls]
    first = calls[0][1]
    assert sorted(first) == ["a", "b", "b"]  # a's pass before its save, and all of b's
    assert calls[1:] == (
        [("save_weights", ["a"]), ("optim_steps", ["b"])]
        if first[0] == "a"
        else [("optim_steps", ["b"]), ("save_weights", ["a"])]
    ) + [("forward_backward", ["a"]), ("optim_steps", ["a"])]  # a's pass after its save
    assert fake.saved["tinker://a/weights/1"][0] == 1.0  # saved before a's step: not stepped
    order = [s for s in fake_lab.settled if s.startswith("a:")]
    assert order == ["a:1", "a:2", "a:3", "a:4"]


def test_a_bad_request_in_the_batch_fails_alone_and_nothing_of_it_is_applied(
    fake_lab: Lab,
) -> None:
    fake: FakeBackend = fake_lab.worker.backend  # type: ignore[assignment]
    fake_lab.create("a", "t", priority=0)
    fake_lab.create("b", "t", priority=0)
    tokens = np.array([5, 10**6], dtype=np.int64)  # past the vocabulary
    inputs = {"target_tokens": tokens, "weights": np.ones(2, dtype=np.float32)}
    bad = fake_lab.submit("a", 1, ForwardBackward([Datum(tokens, inputs)], "cross_entropy"), "t", 0)
    good = fake_lab.submit("a", 2, forward_backward(), "t", 0)
    fake_lab.submit("a", 3, optim(), "t", 0)
    fake_lab.steps("b", 1, 1, "t", priority=0)
    fake.calls.clear()
    fake_lab.run()
    assert sorted(fake.batches()[0]) == ["a", "a", "b", "b"]  # the bad one was in the batch
    error = settled_body(fake_lab, bad).value
    assert error["category"] == "user" and "outside the vocabulary" in error["error"]
    assert settled_body(fake_lab, good).kind is Kind.FORWARD_BACKWARD
    assert fake.models["a"].weight == 1 - 4e-3  # stepped on the good pass's 4 tokens alone
    assert fake.models["b"].weight == 1 - 8e-3


def test_priorities_order_the_batches_and_the_requests_in_a_batch(
    fake_lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "AGING_SECONDS", 1000.0)  # no aging within the test
    fake: FakeBackend = fake_lab.worker.backend  # type: ignore[assignment]
    for model_id, priority in (("low", 0), ("high", 5), ("early", 5)):
        fake_lab.create(model_id, model_id, priority)
    fake_lab.steps("low", 1, 1, "low", priority=0)  # queued first
    fake_lab.steps("early", 1, 1, "early", priority=5)
    time.sleep(0.05)  # early has waited longer: first of its level
    fake_lab.steps("high", 1, 1, "high", priority=5)
    fake.calls.clear()
    fake_lab.run()
    assert fake.batches() == [["early", "early", "high", "high"], ["low", "low"]]
    assert fake.batches("optim_steps") == [["early", "high"], ["low"]]


def test_a_model_whose_creation_failed_fails_alone_in_the_batch(fake_lab: Lab) -> None:
    fake: FakeBackend = fake_lab.worker.backend  # type: ignore[assignment]
    fake_lab.create("a", "t", priority=0)
    fake_lab.scheduler.open_model("broken")
    fake_lab.submit("broken", 0, CreateModel("bad/base", LoraConfig(rank=4)), "t", 0)
    broken = fake_lab.submit("broken", 1, forward_backward(), "t", 0)
    stepped = fake_lab.submit("broken", 2, optim(), "t", 0)
    fake_lab.steps("a", 1, 1, "t", priority=0)
    fake_lab.run()
    for request_id in (broken, stepped):
        error = settled_body(fake_lab, request_id).value["error"]
        assert "model broken could not be created" in error
    assert fake.batches() == [["a", "a"]] and fake.batches("optim_steps") == [["a"]]
    assert fake.models["a"].steps == 1


# -- typed results -----------------------------------------------------------------------------


def test_each_future_holds_its_requests_kind_and_plain_value(fake_lab: Lab) -> None:
    """The worker settles `results.Result`s; how a client sees one is its API surface's
    business, so the worker never loads a wire format."""
    fake_lab.create("a", "t", priority=0)
    requests = [forward_backward(), optim(), SaveWeights("tinker://a/weights/1"), RemoveModel()]
    ids = [fake_lab.submit("a", seq, p, "t", 0) for seq, p in enumerate(requests, 1)]
    fake_lab.run()
    passed, stepped, saved, removed = (settled_body(fake_lab, i) for i in ids)
    assert passed.kind is Kind.FORWARD_BACKWARD
    assert passed.forward_backward().metrics["num_tokens:sum"] == 4.0
    assert passed.forward_backward().loss_fn_outputs[0]["logprobs"].dtype == np.float32
    assert (stepped.kind, stepped.info()) == (
        Kind.OPTIM_STEP, {"grad_norm:mean": 4.0, "learning_rate:mean": 1e-3},
    )  # fmt: skip
    assert (saved.kind, saved.info()) == (Kind.SAVE_WEIGHTS, {"path": "tinker://a/weights/1"})
    assert (removed.kind, removed.info()) == (Kind.REMOVE_MODEL, {"model_id": "a", "removed": True})
    code = "import sys, tinkerd.worker\nassert 'tinkerd.wire' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_backend_answer_of_the_wrong_type_fails_its_request_alone(
    fake_lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake: FakeBackend = fake_lab.worker.backend  # type: ignore[assignment]
    fake_lab.create("a", "t", priority=0)
    fake_lab.create("b", "t", priority=0)
    answer = fake.forward_backward

    def a_dict_for_a(requests: list) -> list:  # a's answer is not a ForwardBackwardResult
        answers = zip(requests, answer(requests), strict=True)
        return [{"loss": 1.0} if model_id == "a" else r for (model_id, _), r in answers]

    monkeypatch.setattr(fake, "forward_backward", a_dict_for_a)
    bad, good = (fake_lab.submit(m, 1, forward_backward(), "t", 0) for m in ("a", "b"))
    fake_lab.run()
    assert settled_body(fake_lab, bad).value == {
        "error": "the backend answered a dict to a forward_backward",
        "category": "server",
    }
    assert settled_body(fake_lab, good).kind is Kind.FORWARD_BACKWARD
