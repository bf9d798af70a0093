"""tinkerd's sampling engine: continuous batching of every request on a base model, whatever its
adapter, over a preallocated KV cache.

Each step is one packed pass (tinkerd.kv_cache): one token for every sequence that is decoding,
then the whole prompt of each request that joins, with no padding. Each request's tokens go
through its own LoRA adapter (the base, a snapshot, a sampler checkpoint: `packing.routed`), so
requests of many adapters share every step. A sequence that finishes leaves at once and frees its
cache; waiting requests join at the next step, so one long sample never holds the others.

Samples are drawn by inverse CDF from a uniform that depends only on the request's seed, the
sample's index and the token's position (a counter-based hash), so a seed gives the same tokens
whatever else is batched alongside or however steps are composed. Per-token logprobs are
log softmax(logits / temperature), before top-k and top-p. Token ids in, token ids out: stop
strings are matched through `decode`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

from tinkerd import kv_cache, packing
from tinkerd.kv_cache import BLOCK, BlockPool, Plan, blocks_for
from tinkerd.logprobs import causal_lm, prompt_logprobs, split_causal_lm, vocab_size
from tinkerd.types import (
    Sample,
    SampledSequence,
    SampleResult,
    ServerError,
    TinkerdError,
    UserError,
)

log = logging.getLogger(__name__)

EMPTY_TOPK = (0, -99999.0)  # the wire's filler for a top-k slot with no token
MASK64 = (1 << 64) - 1
Done = Callable[[SampleResult | TinkerdError], None]


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


# -- requests and their sequences -----------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    sample: Sample
    adapter: str | None  # the LoRA adapter its tokens go through; None: the base alone
    done: Done
    rows: list[_Row] = field(default_factory=list)
    left: int = 0  # rows not finished
    result: SampleResult = field(default_factory=lambda: SampleResult([]))

    @property
    def order(self) -> tuple[bool, str]:
        return (self.adapter is not None, self.adapter or "")


@dataclass(eq=False)
class _Row:
    """One sample of a request: a sequence with its own cache blocks."""

    request: _Request
    seed: int  # 64 bits: its uniforms are hash(seed, position)
    max_new: int
    stops: frozenset[int]
    slot: int = -1  # its line of the block tables
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in its blocks
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 (its step, then its finalizer) of each uint64 of z, wrapping: a well-mixed
    64-bit hash."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_seed(seed: int, j: int, prompt: np.ndarray) -> int:
    """The 64-bit seed of sample j of a request seeded `seed` on `prompt`. The prompt takes part
    so that requests given one seed (an RL batch often is) draw independently of each other."""
    digest = hashlib.blake2b(np.ascontiguousarray(prompt, dtype=np.int64).tobytes(), digest_size=8)
    mixed = _mix64(np.array([seed & MASK64, j], dtype=np.uint64))
    prompt_hash = np.uint64(int.from_bytes(digest.digest(), "little"))
    return int(_mix64(mixed[:1] ^ mixed[1:] ^ prompt_hash)[0])


def _uniforms(seeds: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """(B,) float64 uniforms in [0, 1), the splitmix64 hash of each (seed, position)."""
    z = np.asarray(seeds, dtype=np.uint64) + np.asarray(positions, dtype=np.uint64) * (
        np.uint64(0x9E3779B97F4A7C15)
    )
    return (_mix64(z) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _stop_tokens(sample: Sample, eos_token_ids: set[int]) -> frozenset[int]:
    """EOS ends a row unless `stop` is [] (then only max_tokens does); stop ids add to it."""
    params = sample.params
    if params.stop_tokens == () and not params.stop_strings:
        return frozenset()
    return frozenset(eos_token_ids) | frozenset(params.stop_tokens or ())


# -- the engine ------------------------------------------------------------------------------------


class Engine:
    """Continuous batching on one base model: `add` requests, then `step` while `busy`.

    Args:
        context_length: the model's context; a request generates at most up to it.
        eos_token_ids: what ends a sample unless its `stop` is [].
        decode: token ids -> text, for stop strings.
        cache_tokens: tokens of keys and values the cache holds (all layers), allocated on the
            first step and kept.
        max_rows: sequences decoding at once; more wait for a free one.
        max_step_tokens: prompt tokens that join in one step (a longer prompt joins alone).
    """

    def __init__(
        self,
        *,
        context_length: int,
        eos_token_ids: set[int],
        decode: Callable[[list[int]], str],
        device: torch.device,
        cache_tokens: int,
        max_rows: int = 256,
        max_step_tokens: int = 4096,
    ) -> None:
        self.context_length = context_length
        self.eos_token_ids = set(eos_token_ids)
        self.decode = decode
        self.device = device
        self.max_rows = max_rows
        self.max_step_tokens = max_step_tokens
        self.pool = BlockPool(max(blocks_for(cache_tokens), blocks_for(context_length)), device)
        self._adapters: dict[str, int] = {}  # requests queued or running per adapter
        self.waiting: deque[_Request] = deque()
        self.running: list[_Row] = []
        self._tables = torch.zeros(0, blocks_for(context_length), dtype=torch.long, device=device)
        self._free_slots: list[int] = []
        self._checked = False
        self._layers: tuple[object, list] = (None, [])

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, sample: Sample, adapter: str | None, done: Done) -> None:
        """Queue a checked request (`check_sample`); `done` gets its result or its error."""
        request = _Request(sample, adapter, done)
        limit = self.context_length - len(sample.prompt)
        max_tokens = sample.params.max_tokens
        max_new = min(max_tokens, limit) if max_tokens else limit
        stops = _stop_tokens(sample, self.eos_token_ids)
        seed = sample.params.seed
        if seed is None:
            seed = secrets.randbits(64)
        for j in range(sample.num_samples):
            request.rows.append(_Row(request, row_seed(seed, j, sample.prompt), max_new, stops))
        request.left = len(request.rows)
        if adapter is not None:
            self._adapters[adapter] = self._adapters.get(adapter, 0) + 1
        self.waiting.append(request)

    def step(self, model: nn.Module, routed: bool = True) -> None:
        """One pass: every decoding sequence's next token, and the prompts of those that join.
        With `routed` False the model runs as it is (its active adapter) for every request."""
        joining = self._admit()
        decoding = sorted(self.running, key=lambda r: r.request.order)
        joining.sort(key=lambda q: q.order)
        if not decoding and not joining:
            return
        involved = {id(r.request): r.request for r in decoding} | {id(q): q for q in joining}
        self.running += [row for q in joining for row in q.rows]
        try:
            with torch.no_grad():
                self._pass(model, routed, decoding, joining)
        except Exception as e:  # the step's requests fail together; the engine goes on
            if isinstance(e, torch.OutOfMemoryError):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                error: TinkerdError = UserError("out of memory: sample fewer tokens")
            elif isinstance(e, TinkerdError):
                error = e
            else:
                log.exception("a sampling step failed")
                error = ServerError(f"sampling failed: {type(e).__name__}: {e}")
            for request in involved.values():
                self._fail(request, error)

    def _lora_layers(self, model: nn.Module) -> list:
        """The model's LoRA layers, found again only when its adapters change (a new adapter
        may wrap more layers)."""
        key = (id(model), tuple(getattr(model, "peft_config", ())))
        if self._layers[0] != key:
            self._layers = (key, packing.lora_layers(model))
        return self._layers[1]

    # -- admission and release ---------------------------------------------------------------

    def _admit(self) -> list[_Request]:
        """Waiting requests, in order, while rows, cache blocks and the step's prompt budget
        allow; the first of a step always fits the budget, and fits the rows when none decode, so
        that neither a long prompt nor many samples wait for ever."""
        joining: list[_Request] = []
        rows = len(self.running)
        budget = self.max_step_tokens
        while self.waiting:
            request = self.waiting[0]
            n, k = len(request.sample.prompt), len(request.rows)
            if (rows and rows + k > self.max_rows) or (joining and n > budget):
                break  # a longer prompt joins first at a next step, beside the decoding rows
            shared = n // BLOCK  # the prompt's full blocks, shared by its rows
            own = blocks_for(n + request.rows[0].max_new - 1) - shared
            need = shared + k * own
            if need > self.pool.max_blocks:
                self.waiting.popleft()
                request.left = 0
                self._settle(
                    request,
                    UserError(
                        f"this request needs {need * BLOCK} tokens of KV cache; the sampler's "
                        f"cache holds {self.pool.max_blocks * BLOCK}: sample fewer or shorter"
                    ),
                )
                continue
            if not self.pool.reserve(need):
                break
            self.waiting.popleft()
            prompt_blocks = self.pool.take(shared)
            for i, row in enumerate(request.rows):
                if i:
                    self.pool.share(prompt_blocks)
                row.blocks = prompt_blocks + self.pool.take(own)
                row.slot = self._slot()
                self._tables[row.slot, : len(row.blocks)] = torch.tensor(row.blocks)
            joining.append(request)
            rows += k
            budget -= n
        return joining

    def _slot(self) -> int:
        if not self._free_slots:
            size = self._tables.shape[0]
            grown = max(2 * size, 64)
            self._tables = torch.cat(
                [self._tables, self._tables.new_zeros(grown - size, self._tables.shape[1])]
            )
            self._free_slots = list(range(grown - 1, size - 1, -1))
        return self._free_slots.pop()

    def _release(self, row: _Row) -> None:
        if row.slot >= 0:
            self.pool.release(row.blocks)
            self._free_slots.append(row.slot)
            row.slot, row.blocks = -1, []

    def _fail(self, request: _Request, error: TinkerdError) -> None:
        if request.left == 0:
            return
        for row in request.rows:
            self._release(row)
        self.running = [r for r in self.running if r.request is not request]
        if request in self.waiting:
            self.waiting.remove(request)
        request.left = 0
        self._settle(request, error)

    def _finish(self, row: _Row) -> None:
        self._release(row)
        request = row.request
        request.left -= 1
        if request.left:
            return
        request.result.sequences = [
            SampledSequence(
                np.asarray(r.tokens, dtype=np.int32),
                np.asarray(r.logprobs, dtype=np.float32),
                r.stop_reason or "length",
            )
            for r in request.rows
        ]
        self._settle(request, request.result)

    def _settle(self, request: _Request, outcome: SampleResult | TinkerdError) -> None:
        if request.adapter is not None:
            self._adapters[request.adapter] -= 1
            if not self._adapters[request.adapter]:
                del self._adapters[request.adapter]
        request.done(outcome)

    def uses(self, adapter: str) -> bool:
        """Whether a request queued or running goes through `adapter` (it must stay loaded)."""
        return adapter in self._adapters

    # -- one pass ------------------------------------------------------------------------------

    def _pass(
        self, model: nn.Module, routed: bool, decoding: list[_Row], joining: list[_Request]
    ) -> None:
        plan, input_ids, position_ids, picks = self._plan(decoding, joining)
        body, unembed = split_causal_lm(model)
        lm = causal_lm(model)
        # The body's tokens, then the picked last positions, each through its adapter.
        token_owners = [r.request for r in decoding] + [
            q for q in joining for _ in range(len(q.sample.prompt))
        ]
        pick_owners = [r.request for r in decoding] + joining
        router = (
            packing.routed(model, _routes(token_owners), self._lora_layers(model), frozen=True)
            if routed
            else contextlib.nullcontext(packing.Routing(()))  # the model as it is
        )
        with kv_cache.sampling_pass(lm, plan), router as routing:
            hidden = body(
                input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False
            ).last_hidden_state[0]  # (N, H)
            routing.routes = _routes(pick_owners) if routed else ()
            logits = unembed(hidden[picks]).float()  # (S, V)
        if not self._checked:
            layers = getattr(lm.config.get_text_config(), "num_hidden_layers", plan.layers_run)
            if plan.layers_run != layers or plan.layers_run == 0:
                raise ServerError(
                    f"{type(lm).__name__}: {plan.layers_run} of its {layers} layers ran "
                    "tinkerd's cached attention; this model family is not supported"
                )
            self._checked = True
        offset = len(decoding)
        for q in joining:
            n = len(q.sample.prompt)
            for row in q.rows:
                row.cached = n
            if q.sample.prompt_logprobs or q.sample.topk_prompt_logprobs:
                head = packing.adapter_unembed(unembed, q.adapter) if routed else unembed
                _prompt_logprobs(q, hidden[offset : offset + n - 1], head)
            offset += n
        rows = decoding + [row for q in joining for row in q.rows]
        if any(len(q.rows) != 1 for q in joining):  # a prompt's logits, once for each sample
            expand = list(range(len(decoding))) + [
                len(decoding) + i for i, q in enumerate(joining) for _ in q.rows
            ]
            logits = logits[torch.tensor(expand, device=logits.device)]
        tokens, logprobs = sample_tokens(logits, rows)
        for row in decoding:
            row.cached += 1
        for row, token, logprob in zip(rows, tokens, logprobs, strict=True):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if token in row.stops or _hits_stop_string(row, self.decode):
                row.stop_reason = "stop"
            elif len(row.tokens) >= row.max_new:
                row.stop_reason = "length"
        done = [row for row in rows if row.stop_reason is not None]
        if done:
            finished = set(map(id, done))
            self.running = [r for r in self.running if id(r) not in finished]
            for row in done:
                self._finish(row)

    def _plan(
        self, decoding: list[_Row], joining: list[_Request]
    ) -> tuple[Plan, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pass's plan, its (N,) input ids and positions, and the (S,) row positions whose
        logits are sampled: each decoding token, and each joining prompt's last token."""
        tokens = [r.tokens[-1] for r in decoding]
        positions = [r.cached for r in decoding]
        write_tokens = list(range(len(decoding)))
        write_slots = [r.blocks[r.cached // BLOCK] * BLOCK + r.cached % BLOCK for r in decoding]
        picks = list(range(len(decoding)))
        starts, lengths = [], []
        offset = len(decoding)
        for q in joining:
            prompt = q.sample.prompt
            n = len(prompt)
            tokens += prompt.tolist()
            positions += range(n)
            t = np.arange(n)
            for i, row in enumerate(q.rows):
                # the first row writes the whole prompt (its full blocks are everyone's); the
                # others write only the part in their own, last, block
                part = t if i == 0 else t[(n // BLOCK) * BLOCK :]
                blocks = np.asarray(row.blocks)
                write_tokens += (offset + part).tolist()
                write_slots += (blocks[part // BLOCK] * BLOCK + part % BLOCK).tolist()
            starts.append(offset)
            lengths.append(n)
            picks.append(offset + n - 1)
            offset += n
        device = self.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        plan = Plan(self.pool, len(decoding), as_tensor(write_tokens), as_tensor(write_slots))
        if decoding:
            width = max(blocks_for(r.cached + 1) for r in decoding)
            slots = as_tensor([r.slot for r in decoding])
            plan.tables = self._tables[slots, :width]
            plan.lengths = as_tensor([r.cached + 1 for r in decoding])
        if joining:
            m = max(lengths)
            index = np.asarray(starts)[:, None] + np.minimum(
                np.arange(m)[None], np.asarray(lengths)[:, None] - 1
            )
            valid = np.concatenate([p * m + np.arange(n) for p, n in enumerate(lengths)])
            plan.prefill_index = torch.from_numpy(index).to(device)
            plan.prefill_lengths = as_tensor(lengths)
            plan.prefill_valid = torch.from_numpy(valid).to(device)
        return plan, as_tensor(tokens), as_tensor(positions), as_tensor(picks)


def _routes(owners: list[_Request]) -> list[packing.Route]:
    """One route per run of consecutive positions of the same adapter (the base: none)."""
    routes: list[packing.Route] = []
    start = 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i].adapter != owners[start].adapter:
            name = owners[start].adapter
            if name is not None:
                routes.append(packing.Route(name, start, i))
            start = i
    return routes


def _hits_stop_string(row: _Row, decode: Callable[[list[int]], str]) -> bool:
    strings = row.request.sample.params.stop_strings
    if not strings:
        return False
    # A stop string of n characters spans at most ~4n byte-level tokens; decode only that tail.
    longest = max(len(s) for s in strings)
    tail = decode(row.tokens[-(4 * longest + 4) :])
    return any(s in tail for s in strings)


# -- drawing tokens --------------------------------------------------------------------------------


def sample_tokens(logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[float]]:
    """One token per row from (B, V) fp32 logits, and its logprob under
    log softmax(logits / temperature) (before top-k and top-p)."""
    params = [r.request.sample.params for r in rows]
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], device=device)
    greedy = temps <= 0
    # Shifted so the top logit is 0: a tiny temperature then gives -inf, never inf or NaN.
    shifted = logits - logits.max(-1, keepdim=True).values
    scaled = shifted / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(-1)
    logprobs = scaled.log_softmax(-1)  # (B, V)
    filtered = _top_k_top_p(scaled, params)
    tokens = filtered.argmax(-1)
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if drawn:
        u = _uniforms([rows[i].seed for i in drawn], [len(rows[i].tokens) for i in drawn])
        index = torch.tensor(drawn, device=device)
        tokens[index] = _inverse_cdf(filtered[index].softmax(-1), torch.from_numpy(u).to(device))
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens.tolist(), chosen.tolist()


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """(B,) the first token whose cumulative probability exceeds u x the total, in float64 (a
    chunk of rows at a time); a token of probability 0 is never drawn."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    step = max(1, chunk_bytes // (8 * probs.shape[1]))
    for s in range(0, probs.shape[0], step):
        cdf = probs[s : s + step].double().cumsum(-1)
        total = cdf[:, -1:]
        x = torch.minimum(
            u[s : s + step, None] * total, torch.nextafter(total, torch.zeros_like(total))
        )
        out[s : s + step] = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return out


def _top_k_top_p(scaled: torch.Tensor, params: list) -> torch.Tensor:
    """The scaled logits with -inf outside each row's top k and its top-p nucleus."""
    vocab = scaled.shape[-1]
    rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    if not rows:
        return scaled
    index = torch.tensor(rows, device=scaled.device)
    sorted_logits, order = scaled[index].sort(-1, descending=True)
    ks = torch.tensor(
        [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows],
        device=scaled.device,
    )
    keep = torch.arange(vocab, device=scaled.device).unsqueeze(0) < ks.unsqueeze(-1)
    probs = sorted_logits.masked_fill(~keep, -math.inf).softmax(-1)
    ps = torch.tensor([params[i].top_p for i in rows], device=scaled.device).unsqueeze(-1)
    keep &= (probs.cumsum(-1) - probs) < ps  # keep tokens until their mass reaches top_p
    keep[:, 0] = True
    masked = sorted_logits.masked_fill(~keep, -math.inf)
    out = scaled.clone()
    out[index] = torch.full_like(masked, -math.inf).scatter(-1, order, masked)
    return out


def _prompt_logprobs(request: _Request, hidden: torch.Tensor, unembed: nn.Module) -> None:
    """Fill the request's prompt logprobs and top-k prompt logprobs from the prompt's (n-1, H)
    hidden states, a chunk of positions at a time."""
    sample = request.sample
    targets = torch.from_numpy(sample.prompt[1:].astype(np.int64)).to(hidden.device)
    chosen, values, ids = prompt_logprobs(hidden, unembed, targets, sample.topk_prompt_logprobs)
    fill_prompt_logprobs(request.result, sample, chosen, values, ids)


def fill_prompt_logprobs(
    result: SampleResult,
    sample: Sample,
    chosen: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    """The wire's prompt logprobs (NaN for the first token) and top-k prompt logprobs (k slots
    per position, fillers where the vocabulary has fewer) of (n-1,) and (n-1, k) tensors."""
    n, k = len(sample.prompt), sample.topk_prompt_logprobs
    if sample.prompt_logprobs:
        chosen_np = chosen.cpu().numpy()
        result.prompt_logprobs = np.concatenate([[np.nan], chosen_np]).astype(np.float32)
    if k:
        all_ids = np.full((n, k), EMPTY_TOPK[0], dtype=np.int32)
        all_lps = np.full((n, k), EMPTY_TOPK[1], dtype=np.float32)
        all_ids[1:, : ids.shape[1]] = ids.cpu().numpy()
        all_lps[1:, : values.shape[1]] = values.cpu().numpy()
        result.topk_prompt_logprobs = (all_ids, all_lps)


class _Tempered(nn.Module):
    """A head's logits divided by a temperature."""

    def __init__(self, head: nn.Module, temperature: float) -> None:
        super().__init__()
        self.head, self.temperature = head, temperature
        self.out_features = vocab_size(head)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) / self.temperature


@torch.no_grad()
def score(
    model: nn.Module, adapter: str | None, tokens: np.ndarray, temperature: float = 1.0, k: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of tokens[1:], each given the tokens before it, under
    log softmax(logits / temperature) through `adapter` (None: the base), by one plain forward
    pass of the sequence (the trainer's computation), and the top k per position.

    Returns:
        (n-1,) fp32 logprobs, (n-1, k) top-k logprobs and their ids.
    """
    body, unembed = split_causal_lm(model)
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)
    routes = [packing.Route(adapter, 0, len(ids))] if adapter is not None else []
    with packing.routed(model, routes, frozen=True):  # no route: the base, whatever is active
        hidden = body(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    head = packing.adapter_unembed(unembed, adapter)
    if temperature != 1.0:
        head = _Tempered(head, temperature)
    return prompt_logprobs(hidden[:-1], head, ids[1:], k)


# -- all at once -----------------------------------------------------------------------------------


def generate(
    model: nn.Module,
    samples: list[Sample],
    *,
    adapters: Sequence[str | None] | None = None,
    engine: Engine | None = None,
    context_length: int = 2048,
    eos_token_ids: set[int] | None = None,
    decode: Callable[[list[int]], str] = str,
    device: torch.device | None = None,
) -> list[SampleResult | TinkerdError]:
    """Sample every request of `samples` (checked) on `engine` until all are done; results in
    the same order. `adapters` names each request's LoRA adapter (None: the base); without it
    the model runs as it is. Without `engine`, one sized for these requests."""
    if engine is None:
        device = device or next(model.parameters()).device
        need = sum(
            s.num_samples
            * min(context_length, len(s.prompt) + (s.params.max_tokens or context_length))
            for s in samples
        )
        engine = Engine(
            context_length=context_length,
            eos_token_ids=eos_token_ids or set(),
            decode=decode,
            device=device,
            cache_tokens=need + BLOCK * sum(s.num_samples for s in samples),
        )
    results: list[SampleResult | TinkerdError | None] = [None] * len(samples)
    for i, sample in enumerate(samples):
        adapter = adapters[i] if adapters is not None else None
        engine.add(sample, adapter, partial(results.__setitem__, i))
    while engine.busy:
        engine.step(model, routed=adapters is not None)
    lost = ServerError("the sampler lost this request")  # never: an idle engine answered all
    return [r if r is not None else lost for r in results]
