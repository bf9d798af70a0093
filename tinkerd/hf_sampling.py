"""The HF backend's sampling side: every sample request of a base model joins its continuous
batch (`tinkerd.sampling.Engine`, or vLLM's with `--sampler vllm`), whatever its weights; sampler
adapters (snapshots, sampler checkpoints) live in the base's sampler tree, never the trainer's,
so sampling runs beside training. A mixin of `HFBackend`, which owns the state it uses."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, set_peft_model_state_dict

from tinkerd import checkpoint_io
from tinkerd.hf_models import LoadedBase, device_memory
from tinkerd.sampling import Done as SampleDone
from tinkerd.sampling import Engine, check_sample
from tinkerd.storage import CheckpointPath
from tinkerd.types import (
    NotFound,
    Sample,
    SampleResult,
    SamplerWeights,
    ServerError,
    TinkerdError,
    UserError,
)

SAMPLERS = ("tinkerd", "vllm")


class Sampling:
    """Sampling for `HFBackend`: the attributes below are its."""

    device: torch.device
    dtype: torch.dtype
    sampler: str
    vllm_engine_args: dict[str, Any]
    sampler_cache_bytes: int
    _bases: dict[str, LoadedBase]
    _samplers: OrderedDict[str, tuple[LoadedBase, str]]
    _max_samplers: int
    _sampler_lock: threading.RLock
    _adapter_dirs: dict[str, Path]
    _names: Iterator[str]

    def _load_base(self, name: str) -> LoadedBase:
        raise NotImplementedError

    def _checkpoint_dir(self, base: LoadedBase, path: CheckpointPath) -> Path:
        raise NotImplementedError

    def sample(self, requests: list[Sample]) -> list[SampleResult | TinkerdError]:
        """Sample every request and wait for all: those of one base model in one continuous
        batch, whatever their weights (the base, a snapshot, a sampler checkpoint), each
        request's tokens through its own adapter. A request that cannot run fails alone."""
        results: list[SampleResult | TinkerdError | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            self.sample_start(request, partial(results.__setitem__, i))
        while any(r is None for r in results) and self.sample_step():
            pass
        return [r or ServerError("the sampler lost this request") for r in results]

    def sample_start(self, request: Sample, done: SampleDone) -> None:
        """Queue a request on its base model's engine; `done` gets its result or its error, from
        the thread that runs `sample_step` (or from this call, if it cannot run)."""
        try:
            base = self._load_base(request.weights.base_model)
            check_sample(request, base.context_length, base.vocab_size)
            with self._sampler_lock:
                adapter = self._sampler_adapter(base, request.weights)
                self._engine(base).add(request, adapter, done)
        except TinkerdError as e:
            done(e)
        except torch.OutOfMemoryError:
            done(UserError("out of memory: sample fewer tokens"))

    def sample_step(self) -> bool:
        """One step of each base model's engine that has work (finished requests leave, waiting
        ones join); whether any work is left."""
        busy = False
        with self._sampler_lock:
            for base in list(self._bases.values()):
                engine = base.engine
                if engine is None or not engine.busy:
                    continue
                sampler = base.sampler_peft or base.sampler
                assert sampler is not None  # made with the base, before its engine
                engine.step(sampler)
                for name in [n for n in base.retired if not engine.uses(n)]:
                    base.retired.discard(name)
                    self._delete_sampler_adapter(base, name)
                busy |= engine.busy
        return busy

    def _engine(self, base: LoadedBase) -> Engine:
        """The base's sampling engine. tinkerd's: its KV cache grows as needed up to
        `sampler_cache_bytes` or a quarter of the device's free memory, at least one whole
        context. vLLM's (`--sampler vllm`): beside it on the device, of the trainer's dtype."""
        if base.engine is None and self.sampler == "vllm":
            from tinkerd.vllm_sampler import VLLMEngine

            base.engine = VLLMEngine(  # type: ignore[assignment]
                base.source.location,
                dtype=str(self.dtype).removeprefix("torch."),
                context_length=base.context_length,
                eos_token_ids=base.eos_token_ids(),
                adapter_dir=lambda name: self._adapter_dir(base, name),
                engine_args=self.vllm_engine_args,
                gpu=self.device.type == "cuda",
            )
        if base.engine is None:
            config = base.model.config.get_text_config()
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = (
                getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads
            )
            itemsize = torch.finfo(self.dtype).bits // 8
            per_token = 2 * config.num_hidden_layers * heads * head_dim * itemsize
            budget = min(self.sampler_cache_bytes, device_memory(self.device)[1] // 4)
            base.engine = Engine(
                context_length=base.context_length,
                eos_token_ids=base.eos_token_ids(),
                decode=base.decode,
                device=self.device,
                cache_tokens=max(budget // per_token, base.context_length),
            )
        return base.engine

    def _sampler_adapter(self, base: LoadedBase, weights: SamplerWeights) -> str | None:
        """The adapter a sampler's requests go through (None: the base alone), read from its
        checkpoint on first use."""
        if weights.snapshot_id is None and weights.model_path is None:
            return None
        cached = self._samplers.get(weights.key)
        if cached is None:
            if weights.snapshot_id is not None:
                raise NotFound(
                    f"sampler weights {weights.snapshot_id} are no longer in memory; save again"
                )
            cached = self._load_sampler(base, CheckpointPath.parse(weights.model_path))
        self._samplers.move_to_end(weights.key)
        return cached[1]

    def _add_sampler_adapter(self, base: LoadedBase, config: PeftLoraConfig) -> str:
        """A new, frozen adapter in the base's sampler tree."""
        name = next(self._names)
        if base.sampler_peft is None:
            assert base.sampler is not None  # made with the base
            base.sampler_peft = get_peft_model(base.sampler, config, adapter_name=name)
        else:
            base.sampler_peft.add_adapter(name, config)
        base.sampler_peft.eval().requires_grad_(False)
        return name

    def _delete_sampler_adapter(self, base: LoadedBase, name: str) -> None:
        if base.sampler_peft is not None and name in base.sampler_peft.peft_config:
            with warnings.catch_warnings():  # "Adapter m1 was active which is now deleted"
                warnings.simplefilter("ignore", UserWarning)
                base.sampler_peft.delete_adapter(name)
        forget = getattr(base.engine, "forget", None)
        if forget is not None:  # vLLM's copy
            forget(name)
        directory = self._adapter_dirs.pop(name, None)
        if directory is not None and directory.parent == ram_dir():  # a snapshot's, ours
            shutil.rmtree(directory, ignore_errors=True)

    def _adapter_dir(self, base: LoadedBase, name: str) -> Path:
        """A sampler adapter as a PEFT directory (for vLLM): a checkpoint's own, or a
        snapshot written to a RAM-backed directory on first need."""
        directory = self._adapter_dirs.get(name)
        if directory is None:
            directory = ram_dir() / name
            directory.mkdir(parents=True, exist_ok=True)
            assert base.sampler_peft is not None
            checkpoint_io.write_adapter(base.sampler_peft, name, base.source.location, directory)
            self._adapter_dirs[name] = directory
        return directory

    def _load_sampler(self, base: LoadedBase, path: CheckpointPath) -> tuple[LoadedBase, str]:
        """Read a checkpoint's adapter once; later samples reuse it from memory."""
        directory = self._checkpoint_dir(base, path)
        name = self._add_sampler_adapter(base, checkpoint_io.read_adapter_config(directory))
        assert base.sampler_peft is not None  # _add_sampler_adapter made it
        try:
            checkpoint_io.load_adapter(base.sampler_peft, name, directory)
        except BaseException:
            self._delete_sampler_adapter(base, name)
            raise
        self._adapter_dirs[name] = directory
        self._cache_sampler(str(path), base, name)
        return base, name

    def _cache_sampler(self, key: str, base: LoadedBase, name: str) -> None:
        """Keep a sampler's adapter, evicting the least recently used beyond the limit (none that
        a queued or running request goes through)."""
        self._drop_sampler(key)
        self._samplers[key] = (base, name)
        for old in list(self._samplers):
            if len(self._samplers) <= self._max_samplers:
                break
            old_base, old_name = self._samplers[old]
            if old != key and not (old_base.engine and old_base.engine.uses(old_name)):
                self._drop_sampler(old)

    def _drop_sampler(self, key: str) -> None:
        """Forget `key`; its adapter goes at once, or once the requests that use it are done."""
        cached = self._samplers.pop(key, None)
        if cached is None:
            return
        base, name = cached
        if base.engine is not None and base.engine.uses(name):
            base.retired.add(name)
        else:
            self._delete_sampler_adapter(base, name)

    def close(self) -> None:
        """Release what outlives the process: vLLM's engine processes (`--sampler vllm`) and
        the snapshots written for them."""
        for base in self._bases.values():
            close = getattr(base.engine, "close", None)
            if close is not None:
                close()
        shutil.rmtree(ram_dir(), ignore_errors=True)

    def hold_sampler(
        self, key: str, base_model: str, config: PeftLoraConfig, state: dict[str, torch.Tensor]
    ) -> None:
        """Hold sampler weights given as a PEFT state dict under `key` (a snapshot id): an
        unnamed sampler save, of a model trained here or elsewhere (the Megatron backend's
        rank 0). The weights are copied."""
        base = self._load_base(base_model)
        with self._sampler_lock:
            name = self._add_sampler_adapter(base, config)
            assert base.sampler_peft is not None
            set_peft_model_state_dict(base.sampler_peft, state, adapter_name=name)
            self._cache_sampler(key, base, name)

    def drop_sampler(self, key: str) -> None:
        """Forget sampler weights held under `key` (a snapshot id or a checkpoint path)."""
        with self._sampler_lock:
            self._drop_sampler(key)


def ram_dir() -> Path:
    """Where snapshots are written for vLLM to read: RAM-backed where the system has one."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return root / f"tinkerd-vllm-{os.getpid()}"
