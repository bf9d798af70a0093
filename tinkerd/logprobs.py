"""Per-token logprobs from the last hidden state, a chunk of positions at a time.

The (tokens x vocab) logits are a batch's largest tensor by far: 2 x 1,536 tokens at Qwen's
151,936-token vocabulary are 1.74 GiB in fp32, and autograd would keep them, their fp32 copy and
log_softmax's output for backward. Here each chunk of positions is projected onto the vocabulary,
reduced to its logprobs at the targets, and dropped; backward projects the chunk again. Only a
(chunk, V) block of logits is alive at any time, in forward and in backward alike.

`unembed` is the model's output embedding module as it is (a PEFT LoRA-wrapped lm_head keeps its
LoRA path and gradients); `split_causal_lm` finds it, and the body whose last hidden state it
projects, in a transformers model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK_BYTES = 64 << 20  # fp32 logits of one chunk: 110 positions at a vocabulary of 151,936


def default_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk so that a chunk's fp32 logits take about CHUNK_BYTES: forward and
    backward hold about three chunks' worth at once."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def vocab_size(unembed: nn.Module) -> int:
    out = getattr(unembed, "out_features", None)
    return int(out) if out is not None else int(cast(Tensor, unembed.weight).shape[0])


def target_logprobs(
    hidden: Tensor, unembed: nn.Module, targets: Tensor, chunk_tokens: int | None = None
) -> Tensor:
    """log softmax(unembed(hidden)) at the targets, in fp32, without the whole logits.

    Args:
        hidden: (..., H) last hidden states (after the model's final norm).
        unembed: the output embedding module, (n, H) -> (n, V) logits.
        targets: (...) or (..., K) token ids, the leading shape of `hidden`.
        chunk_tokens: positions per chunk; by default about CHUNK_BYTES of fp32 logits.

    Returns:
        fp32 logprobs shaped like `targets`. Gradients reach `hidden` and every parameter of
        `unembed` that requires grad, each chunk's logits computed again in backward.
    """
    lead = hidden.shape[:-1]
    if targets.shape[: len(lead)] != lead or targets.dim() > len(lead) + 1:
        raise ValueError(f"targets {tuple(targets.shape)} do not fit hidden {tuple(hidden.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    t = targets.reshape(h.shape[0], -1)  # (N, K)
    chunk = chunk_tokens or default_chunk_tokens(vocab_size(unembed))
    params = [p for p in unembed.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (h.requires_grad or params):
        out = _ChunkedTargetLogprobs.apply(h, t, unembed, chunk, *params)
    else:
        with torch.no_grad():
            out = _forward_chunks(h, t, unembed, chunk)
    return out.view(targets.shape)


def _forward_chunks(h: Tensor, t: Tensor, unembed: nn.Module, chunk: int) -> Tensor:
    out = torch.empty(t.shape, dtype=torch.float32, device=h.device)  # (N, K)
    for s in range(0, h.shape[0], chunk):
        logits = unembed(h[s : s + chunk]).float()  # (c, V): the only one alive
        out[s : s + chunk] = logits.log_softmax(-1).gather(-1, t[s : s + chunk])
    return out


class _ChunkedTargetLogprobs(torch.autograd.Function):
    """Forward keeps only (N, H) hidden states and (N, K) targets. Backward projects each chunk
    again and pushes d logprobs / d logits = onehot(targets) - softmax * sum(grad) through
    `unembed` with autograd, so a LoRA lm_head (or a soft-cap) is differentiated as it is."""

    @staticmethod
    def forward(ctx, h: Tensor, t: Tensor, unembed: nn.Module, chunk: int, *params: Tensor):
        ctx.save_for_backward(h, t, *params)
        ctx.unembed, ctx.chunk = unembed, chunk
        return _forward_chunks(h, t, unembed, chunk)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, t, *params = ctx.saved_tensors
        want_h = ctx.needs_input_grad[0]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[4:], strict=True) if need]
        grad_h = torch.empty_like(h) if want_h else None
        grad_params: list[Tensor | None] = [None] * len(wanted)
        for s in range(0, h.shape[0], ctx.chunk):
            g = grad_out[s : s + ctx.chunk]  # (c, K)
            with torch.enable_grad():
                hc = h[s : s + ctx.chunk].detach().requires_grad_(want_h)
                logits = ctx.unembed(hc).float()  # (c, V)
            d_logits = logits.detach().softmax(-1).mul_(-g.sum(-1, keepdim=True))
            d_logits.scatter_add_(-1, t[s : s + ctx.chunk], g)
            grads = torch.autograd.grad(logits, ([hc] if want_h else []) + wanted, d_logits)
            if grad_h is not None:  # want_h
                grad_h[s : s + ctx.chunk] = grads[0]
                grads = grads[1:]
            for i, grad in enumerate(grads):
                summed = grad_params[i]
                grad_params[i] = grad if summed is None else summed.add_(grad)
        by_param = iter(grad_params)
        rest = [next(by_param) if need else None for need in ctx.needs_input_grad[4:]]
        return grad_h, None, None, None, *rest


@torch.no_grad()
def prompt_logprobs(
    hidden: Tensor, unembed: nn.Module, targets: Tensor, k: int = 0, chunk_tokens: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Logprobs of the next tokens of a prompt and its top k per position, chunk by chunk.

    Args:
        hidden: (N, H) hidden states; position i predicts targets[i].
        targets: (N,) token ids.

    Returns:
        (N,) fp32 logprobs at the targets, (N, min(k, V)) top-k fp32 logprobs and their ids.
    """
    chunk = chunk_tokens or default_chunk_tokens(vocab_size(unembed))
    k = min(k, vocab_size(unembed))
    chosen = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    values = torch.empty(hidden.shape[0], k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(hidden.shape[0], k, dtype=torch.long, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        lp = unembed(hidden[s : s + chunk]).float().log_softmax(-1)  # (c, V)
        chosen[s : s + chunk] = lp.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
        if k:
            values[s : s + chunk], ids[s : s + chunk] = lp.topk(k, dim=-1)
    return chosen, values, ids


# -- finding the body and the unembedding of a transformers model -----------------------------


class _ScaledHead(nn.Module):
    """lm_head followed by what a model family applies to its logits (Cohere's logit_scale,
    Granite's logits_scaling, Gemma's final soft-cap), so that it equals model(...).logits."""

    def __init__(self, head: nn.Module, scale: float, softcap: float | None) -> None:
        super().__init__()
        self.head, self.scale, self.softcap = head, scale, softcap
        self.out_features = vocab_size(head)

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.head(hidden) * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (LoRA layers injected), or `model` itself.
    Not PeftModel.get_base_model(): it reads the active adapter's config, which raises once
    that adapter has been deleted (a sampler tree whose snapshots were all dropped)."""
    tuner = getattr(model, "base_model", None)
    inner = getattr(tuner, "model", None)
    lm = inner if hasattr(model, "peft_config") and isinstance(inner, nn.Module) else model
    return cast("PreTrainedModel", lm)


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, unembed) of a transformers causal LM, bare or PEFT-wrapped.

    body(input_ids=..., ...).last_hidden_state is the hidden state after the final norm, and
    unembed(it) equals model(...).logits. Checked once per model on a two-token probe: a family
    that does something else between its final norm and its logits is refused, never silently
    given other numbers.
    """
    lm = causal_lm(model)
    body = getattr(lm, lm.base_model_prefix)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    scale = float(getattr(lm, "logit_scale", None) or 1.0)  # Cohere keeps it on the model
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)  # Granite
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 and 3
    head = lm.get_output_embeddings()
    unembed = head if scale == 1.0 and softcap is None else _ScaledHead(head, scale, softcap)
    if not getattr(lm, "_tinkerd_head_checked", False):
        _check_split(model, body, unembed)
        lm.__dict__["_tinkerd_head_checked"] = True  # a plain attribute, as `lm.x = ...` sets
    return body, unembed


def _check_split(model: nn.Module, body: nn.Module, unembed: nn.Module) -> None:
    device = next(model.parameters()).device
    probe = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        want = causal_lm(model)(input_ids=probe).logits.float()
        got = unembed(body(input_ids=probe).last_hidden_state).float()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6):
        raise ValueError(
            f"{type(model).__name__}: its logits are not its output embedding of the last hidden "
            "state; this model family is not supported"
        )


# -- measuring ----------------------------------------------------------------------------------


def peak_memory_growth(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes by which the peak memory in use grows while fn() runs (for tests and bench/).

    CUDA: torch's peak allocated bytes. CPU (Linux): the process's peak resident set, reset through
    /proc/self/clear_refs before fn runs; memory freed back to the system counts as freed, and
    allocator caches can only make the figure larger, never smaller. Run it in a fresh process
    for a figure free of earlier allocations' leftovers.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    text = Path(f"/proc/{os.getpid()}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))
