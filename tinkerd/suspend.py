"""A clean stop keeps every model: the next start on the same data directory answers it again.

When `tinkerd serve`, or the last worker of a cluster, stops cleanly (SIGTERM, Ctrl-C), each
model it holds is saved exactly as it is (adapter weights, AdamW state, the gradients
accumulated since its last optim_step) as a checkpoint of its run without TTL, and a manifest in
`<data_dir>/stopped/` says how to re-create it: from that checkpoint, at the seq_id of the last
request it applied, with the registry records that make it a live model (the model, its run,
its session, its names) and, in a cluster, the requests that reached it too late to run.

The next start (`tinkerd serve`, or the first `tinkerd worker` to start) claims each manifest
(a rename: one process wins), puts the records back, and queues the re-creation as the model's
request at that seq_id, so the client's next request (the seq_id after it) follows it. The same
model id, and the same SDK TrainingClient with its seq_ids, go on as if nothing had happened.
Loading the checkpoint consumes it (`HFBackend.create_model`): nothing a clean stop saves is
left to expire, nor kept once the model lives again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinkerd.registry import Registry
from tinkerd.storage import CheckpointPath
from tinkerd.tasks import Scheduler, Task
from tinkerd.types import Backend, CreateModel, LoraConfig, SaveWeights

log = logging.getLogger(__name__)

STOPPED_DIR = "stopped"


@dataclass
class StoppedModel:
    """A model saved by a clean stop, and what re-creates it."""

    model_id: str
    checkpoint: str  # tinker:// path of its exact state; no TTL
    seq_id: int  # of the last request it applied: its re-creation takes this seq_id
    base_model: str
    lora: dict[str, Any]
    records: list[list[Any]] = field(default_factory=list)  # (kind, key, value): the registry's
    queued: list[list[Any]] = field(default_factory=list)  # Celery task args that came too late
    stopped_at: float = field(default_factory=time.time)
    stopped_by: str = ""
    tenant: str = ""

    def recreation(self) -> Task:
        """The task that re-creates the model from its checkpoint, as its request at `seq_id`."""
        create = CreateModel(
            self.base_model,
            LoraConfig(**self.lora),
            from_checkpoint=self.checkpoint,
            with_optimizer=True,
            with_gradients=True,
        )
        return Task(f"restore-{uuid.uuid4().hex}", self.model_id, self.seq_id, create, self.tenant)


def stopped_dir(data_dir: Path) -> Path:
    return Path(data_dir) / STOPPED_DIR


def _manifest(data_dir: Path, model_id: str) -> Path:
    if "/" in model_id or model_id.startswith("."):
        raise ValueError(f"invalid model id {model_id!r}")
    return stopped_dir(data_dir) / f"{model_id}.json"


def save(
    backend: Backend,
    data_dir: Path,
    model_id: str,
    seq_id: int,
    stopped_by: str,
    records: list[tuple[str, str, dict[str, Any]]],
) -> StoppedModel:
    """Save `model_id`'s exact state and its manifest, with its registry `records`
    (`Registry.records_of`); the backend must be idle."""
    path = CheckpointPath(model_id, "weights", f"stopped-{uuid.uuid4().hex[:12]}")
    backend.save_weights(
        model_id,
        SaveWeights(
            str(path),
            "weights",
            ttl_seconds=None,
            user_metadata={"stopped": f"{stopped_by} stopped; restored at the next start"},
            with_gradients=True,
        ),
    )
    create = backend.creation(model_id)
    owner = next((v.get("owner", "") for kind, _, v in records if kind == "model"), "")
    model = StoppedModel(
        model_id,
        str(path),
        seq_id,
        create.base_model,
        asdict(create.lora),
        [list(r) for r in records],
        stopped_by=stopped_by,
        tenant=owner,
    )
    write(data_dir, model)
    return model


def write(data_dir: Path, model: StoppedModel) -> None:
    """Write `model`'s manifest atomically and durably."""
    final = _manifest(data_dir, model.model_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(asdict(model), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def claim(data_dir: Path) -> Iterator[StoppedModel]:
    """Each stopped model's manifest that this process wins (processes sharing the data
    directory race by renaming it), read and removed: the caller restores it."""
    directory = stopped_dir(data_dir)
    for manifest in sorted(directory.glob("[!.]*.json")):
        claimed = directory / f".claimed-{uuid.uuid4().hex}"
        try:
            os.rename(manifest, claimed)
        except FileNotFoundError:
            continue  # another process claimed it
        try:
            model = StoppedModel(**json.loads(claimed.read_text()))
        except (OSError, ValueError, TypeError) as e:
            log.error("cannot read the stopped model %s (%s); left as %s", manifest, e, claimed)
            continue
        claimed.unlink()
        yield model


def restore(model: StoppedModel, scheduler: Scheduler, registry: Registry) -> Task:
    """Put back `model`'s records and queue its re-creation (and the requests saved with it);
    returns the re-creation."""
    registry.put_back([(kind, key, value) for kind, key, value in model.records])
    task = model.recreation()
    scheduler.enqueue(task)
    if model.queued:
        from tinkerd.cluster.celery_app import queue_task  # plain data; no Celery app is made

        for args in model.queued:
            queue_task(scheduler, *args)
    log.info(
        "restoring model %s from %s (stopped by %s at seq_id %d)",
        model.model_id,
        model.checkpoint,
        model.stopped_by,
        model.seq_id,
    )
    return task
