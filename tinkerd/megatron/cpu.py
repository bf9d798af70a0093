"""megatron-core on the CPU: the three narrow work-arounds its CUDA assumptions need.

megatron-core 0.16 asks `torch.cuda.current_device()` where its tensors go (rotary embeddings,
some buffers), and its RNG tracker forks CUDA generator state; neither exists without a GPU. On a
CPU rank, `current_device` answers "cpu" and the tracker is the inference one, whose fork is a
no-op: exact, since tinkerd runs with dropout 0. Tensor-parallel collectives are untouched (gloo
all-reduce / all-gather). The causal-mask default that builds on "cuda" is avoided by always
passing an explicit mask (`engine.causal_mask`). Nothing here runs on a CUDA rank.
"""

from __future__ import annotations

import torch


def use_cpu() -> None:
    """Make this process's megatron-core run on the CPU (call once, before building models)."""
    from megatron.core.tensor_parallel import random

    # torch types it as returning a device index; megatron-core uses the answer as a device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment, return-value]
    random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def seed_cuda(seed: int) -> None:
    """On CUDA ranks: Megatron's own model-parallel RNG streams (its tracker needs them)."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
