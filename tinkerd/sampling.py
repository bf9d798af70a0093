"""Batched generation with a KV cache: the engine behind `asample`.

Every sample of every request in a batch becomes one row. Prompts are left-padded and prefilled
together, then all rows decode one token per step against the shared cache. Each request samples
from its own torch.Generator when it gives a seed, so the same seed gives the same tokens whatever
else shares the batch. Token ids in, token ids out: stop strings are matched through `decode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tinkerd.logprobs import prompt_logprobs, split_causal_lm
from tinkerd.types import Sample, SampledSequence, SampleResult, SamplingParams, UserError

EMPTY_TOPK = (0, -99999.0)  # the wire's filler for a top-k slot with no token


@dataclass
class _Row:
    request: int
    params: SamplingParams
    max_new: int
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str | None = None


def check_sample(sample: Sample, context_length: int, vocab_size: int) -> None:
    """A UserError if the prompt cannot be sampled from on this model."""
    n = len(sample.prompt)
    if n == 0:
        raise UserError("the prompt is empty")
    if int(sample.prompt.max()) >= vocab_size or int(sample.prompt.min()) < 0:
        raise UserError(f"prompt token ids must be in [0, {vocab_size})")
    if n >= context_length:
        raise UserError(
            f"the prompt has {n} tokens; the model's context is {context_length}, "
            "leaving no room to generate"
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    samples: list[Sample],
    *,
    context_length: int,
    eos_token_ids: set[int],
    decode: Callable[[list[int]], str],
    device: torch.device,
) -> list[SampleResult]:
    """Sample every request of `samples` in one batch; results in the same order."""
    rows: list[_Row] = []
    for r, sample in enumerate(samples):
        limit = context_length - len(sample.prompt)
        max_new = min(sample.params.max_tokens, limit) if sample.params.max_tokens else limit
        for _ in range(sample.num_samples):
            rows.append(_Row(r, sample.params, max_new, [], []))
    generators = _generators(samples, device)
    prompts = [samples[row.request].prompt for row in rows]
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):  # left padding keeps every row's last token at the end
        input_ids[i, width - len(prompt) :] = torch.from_numpy(prompt.astype(np.int64))
        mask[i, width - len(prompt) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # The prefill runs the body alone: its (B, T, H) hidden states, never the (B, T, V) logits;
    # the last position's logits and the prompt logprobs are projected from them.
    body, unembed = split_causal_lm(model)
    out = body(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    hidden = out.last_hidden_state  # (B, T, H)
    results = [SampleResult([]) for _ in samples]
    if any(s.prompt_logprobs or s.topk_prompt_logprobs for s in samples):
        _prompt_logprobs(samples, rows, hidden, unembed, width, results)
    cache, logits = out.past_key_values, unembed(hidden[:, -1:, :])[:, -1, :].float()  # (B, V)
    stops = [_stop_tokens(row.params, eos_token_ids) for row in rows]
    longest_stop = max((len(s) for row in rows for s in row.params.stop_strings), default=0)
    last_pos = positions[:, -1]
    for _ in range(max(row.max_new for row in rows)):
        tokens, logprobs = _sample_step(logits, rows, generators)
        for i, row in enumerate(rows):
            if row.stop_reason is not None:
                continue
            token = int(tokens[i])
            row.tokens.append(token)
            row.logprobs.append(float(logprobs[i]))
            if token in stops[i] or _hits_stop_string(row, decode, longest_stop):
                row.stop_reason = "stop"
            elif len(row.tokens) >= row.max_new:
                row.stop_reason = "length"
        if all(row.stop_reason is not None for row in rows):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=tokens.view(-1, 1),
            attention_mask=mask,
            position_ids=last_pos.view(-1, 1),
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()
    for row in rows:
        results[row.request].sequences.append(
            SampledSequence(
                np.asarray(row.tokens, dtype=np.int32),
                np.asarray(row.logprobs, dtype=np.float32),
                row.stop_reason or "length",
            )
        )
    return results


def _generators(samples: list[Sample], device: torch.device) -> list[torch.Generator | None]:
    gens: list[torch.Generator | None] = []
    for sample in samples:
        if sample.params.seed is None:
            gens.append(None)
        else:
            gen = torch.Generator(device=device)
            gen.manual_seed(sample.params.seed % (2**63))
            gens.append(gen)
    return gens


def _stop_tokens(params: SamplingParams, eos_token_ids: set[int]) -> set[int]:
    """EOS ends a row unless `stop` is [] (then only max_tokens does); stop ids add to it."""
    if params.stop_tokens == () and not params.stop_strings:
        return set()
    return set(eos_token_ids) | set(params.stop_tokens or ())


def _hits_stop_string(row: _Row, decode: Callable[[list[int]], str], longest: int) -> bool:
    if not row.params.stop_strings:
        return False
    # A stop string of n characters spans at most ~4n byte-level tokens; decode only that tail.
    tail = decode(row.tokens[-(4 * longest + 4) :])
    return any(s in tail for s in row.params.stop_strings)


def _sample_step(
    logits: torch.Tensor, rows: list[_Row], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: (B,) ids and (B,) logprobs under log softmax(logits / temperature)."""
    temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
    greedy = temps <= 0
    # Shifted so the top logit is 0: a tiny temperature then gives -inf, never inf or NaN.
    shifted = logits - logits.max(-1, keepdim=True).values
    scaled = shifted / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(-1)
    logprobs = scaled.log_softmax(-1)  # (B, V)
    filtered = _top_k_top_p(scaled, rows)
    probs = filtered.softmax(-1)
    tokens = probs.argmax(-1)
    unseeded = [i for i, r in enumerate(rows) if generators[r.request] is None and not greedy[i]]
    if unseeded:
        tokens[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(-1)
    by_request: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if generators[r.request] is not None and not greedy[i]:
            by_request.setdefault(r.request, []).append(i)
    for request, idx in by_request.items():
        tokens[idx] = torch.multinomial(probs[idx], 1, generator=generators[request]).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _top_k_top_p(scaled: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return scaled
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(-1, descending=True)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=scaled.device)
    keep = torch.arange(vocab, device=scaled.device).unsqueeze(0) < ks.unsqueeze(-1)
    probs = sorted_logits.masked_fill(~keep, -math.inf).softmax(-1)
    ps = torch.tensor(top_p, device=scaled.device).unsqueeze(-1)
    keep &= (probs.cumsum(-1) - probs) < ps  # keep tokens until their mass reaches top_p
    keep[:, 0] = True
    masked = sorted_logits.masked_fill(~keep, -math.inf)
    return torch.full_like(scaled, -math.inf).scatter(-1, order, masked)


def _prompt_logprobs(
    samples: list[Sample],
    rows: list[_Row],
    hidden: torch.Tensor,
    unembed: nn.Module,
    width: int,
    results: list[SampleResult],
) -> None:
    """Fill prompt logprobs (NaN for the first token) and top-k prompt logprobs from the prefill's
    hidden states, a chunk of positions at a time."""
    first_row = {}
    for i, row in enumerate(rows):
        first_row.setdefault(row.request, i)
    for r, sample in enumerate(samples):
        if not (sample.prompt_logprobs or sample.topk_prompt_logprobs):
            continue
        n = len(sample.prompt)
        # Position j of the left-padded row predicts prompt token j + 1.
        h = hidden[first_row[r], width - n : width - 1]  # (n-1, H)
        targets = torch.from_numpy(sample.prompt[1:].astype(np.int64)).to(h.device)
        k = sample.topk_prompt_logprobs
        chosen, values, ids = prompt_logprobs(h, unembed, targets, k)
        if sample.prompt_logprobs:
            chosen_np = chosen.cpu().numpy()
            results[r].prompt_logprobs = np.concatenate([[np.nan], chosen_np]).astype(np.float32)
        if k:
            all_ids = np.full((n, k), EMPTY_TOPK[0], dtype=np.int32)
            all_lps = np.full((n, k), EMPTY_TOPK[1], dtype=np.float32)
            all_ids[1:, : ids.shape[1]] = ids.cpu().numpy()
            all_lps[1:, : values.shape[1]] = values.cpu().numpy()
            results[r].topk_prompt_logprobs = (all_ids, all_lps)
