"""Token generation over any backend that can step a batch: prompts, sampling, EOS, streaming.

before: prompts (a left-padded [batch, seq] tensor with its attention mask, or a list of token-id lists) and
        Hugging Face's generation arguments
after:  the prompts with their continuations (a tensor like Hugging Face's `generate`, or lists)

The backend is anything with `new_session(batch)` (see `Decoder`): a session's `step(input_ids, cache_position)`
runs S new tokens per sequence at absolute positions cache_position[b] + [0, S) and returns their logits. A program
with KV caches steps in O(S) (backends/torch/runtime.py); `RecomputeSession` gives a program without caches the same
interface by re-running all tokens so far. Prompts of different lengths are right-padded internally: prefill runs
every padded slot, each sequence then continues from its own length (its padding slots are overwritten by its decode
steps, and causality keeps padding from reaching its real tokens), so a batch computes what each prompt would alone.
How each token is chosen (Hugging Face's warpers and a seeded draw) is `compiler/sampling.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from compiler.sampling import GenerationError, Sampling, check_int, choose_tokens

TokenIds = torch.Tensor | Sequence[Sequence[int]]
# The most memory one prefill step's logits may take (see `prefill_chunk_size`).
PREFILL_LOGITS_BUDGET = 512 * 2**20


class DecodeSession(Protocol):
    """One batch's state on a backend (its KV caches, or its tokens so far)."""

    def step(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor | None:
        """Logits [batch, S, vocab] of `input_ids` [batch, S] at positions cache_position[b] + [0, S); None on a
        process that does not hold the logits (a rank of an earlier pipeline stage)."""
        ...


class Decoder(Protocol):
    """What generation needs from an executable."""

    vocab_size: int
    device: torch.device

    @property
    def max_seq(self) -> int | None:
        """Positions one sequence may reach (its KV cache length); None when nothing bounds it."""
        ...

    def new_session(self, batch: int) -> DecodeSession: ...


class RecomputeSession:
    """A session for a program without KV caches: it keeps every sequence's tokens in a buffer laid out like a
    cache and re-runs the whole buffer at each step (the cost the `kv-cache` pass removes)."""

    def __init__(
        self, forward: Callable[[torch.Tensor], torch.Tensor | None], batch: int, device: torch.device
    ) -> None:
        self._forward = forward
        self._tokens = torch.zeros((batch, 0), dtype=torch.int64, device=device)

    def step(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor | None:
        seq = input_ids.shape[1]
        slots = cache_position.to(self._tokens.device)[:, None] + torch.arange(seq, device=self._tokens.device)
        end = int(slots.max()) + 1
        if end > self._tokens.shape[1]:
            grown = self._tokens.new_zeros((self._tokens.shape[0], end))
            grown[:, : self._tokens.shape[1]] = self._tokens
            self._tokens = grown
        self._tokens.scatter_(1, slots, input_ids.to(self._tokens))
        logits = self._forward(self._tokens[:, :end])
        if logits is None:
            return None
        return logits.gather(1, slots.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1]))


@dataclass(frozen=True)
class RecomputeDecoder:
    """A `Decoder` over any function from input ids to logits (a backend without sessions: TensorRT engines)."""

    forward: Callable[[torch.Tensor], torch.Tensor | None]
    vocab_size: int
    device: torch.device = torch.device("cpu")
    max_seq: int | None = None

    def new_session(self, batch: int) -> DecodeSession:
        return RecomputeSession(self.forward, batch, self.device)


@dataclass(frozen=True)
class Prompts:
    """Validated prompts: token lists, and the tensor form the caller gave (left-padded) when it gave one."""

    tokens: list[list[int]]
    padded: torch.Tensor | None


def _prompts(input_ids: TokenIds, attention_mask: torch.Tensor | None, vocab: int) -> Prompts:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
            raise GenerationError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                                  f"{list(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise GenerationError("input_ids is a batch of zero prompts")
        if input_ids.shape[1] == 0:
            raise GenerationError("input_ids has zero tokens per prompt")
        ids = input_ids.detach().to("cpu", torch.int64)
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
                got = attention_mask.shape if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise GenerationError(
                    f"attention_mask must be a tensor shaped like input_ids {list(ids.shape)}, got "
                    f"{list(got) if isinstance(got, torch.Size) else got}"
                )
            raw = attention_mask.detach().cpu()
            if not bool(((raw == 0) | (raw == 1)).all()):
                raise GenerationError("attention_mask must hold only 0 and 1")
            mask = raw == 1
            # Left padding: once a row's mask turns 1 it stays 1 (a decoder-only model generates after the last slot).
            if not bool((mask.int().diff(dim=1) >= 0).all()) or not bool(mask[:, -1].all()):
                raise GenerationError("attention_mask must be left padding (zeros, then ones to the end of each row)")
        tokens = [row[keep].tolist() for row, keep in zip(ids, mask)]
        padded = input_ids
    else:
        if attention_mask is not None:
            raise GenerationError("attention_mask applies to a tensor of input_ids, not to a list of prompts")
        if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
            raise GenerationError(
                f"input_ids must be a tensor or a list of token-id lists, got {type(input_ids).__name__}"
            )
        tokens = []
        for index, prompt in enumerate(input_ids):
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                raise GenerationError(f"prompt {index} is not a list of token ids")
            tokens.append(list(prompt))
        if not tokens:
            raise GenerationError("input_ids is a batch of zero prompts")
        padded = None
    for index, prompt in enumerate(tokens):
        if not prompt:
            raise GenerationError(f"prompt {index} has no tokens")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"prompt {index} has token ids outside the vocabulary [0, {vocab})")
    return Prompts(tokens, padded)


def _token_set(name: str, value: int | Sequence[int] | None, vocab: int) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value)
    for token in values:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise GenerationError(f"{name}={value!r} is outside the vocabulary [0, {vocab})")
    return values


def generate(
    decoder: Decoder,
    input_ids: TokenIds,
    max_new_tokens: int = 20,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    share_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prefill_chunk: int | None = None,
) -> torch.Tensor | list[list[int]]:
    """Generates up to `max_new_tokens` per prompt, with Hugging Face's meaning of every argument.

    Args:
        decoder: the backend (see `Decoder`).
        input_ids: a [batch, seq] tensor (left-padded where `attention_mask` has zeros) or a list of token-id lists.
        max_new_tokens: tokens to generate per prompt (fewer for a sequence that emits EOS).
        attention_mask: 1 for real tokens, 0 for left padding (tensor input only).
        do_sample, temperature, top_k, top_p, seed: see `compiler.sampling` (`Sampling`, `process_logits`).
        eos_token_id: a token id (or ids) that ends a sequence; None: generate `max_new_tokens` every time.
        pad_token_id: fills finished sequences in the tensor result; default the first EOS id, else 0.
        streamer: Hugging Face's streamer protocol: `put(prompt tensor)`, then `put(tokens [batch])` per step,
            then `end()`.
        share_tokens: makes every process agree on the chosen tokens (a broadcast from the rank holding the logits);
            identity for one process.
        prefill_chunk: positions per prefill step with a KV cache (default: `prefill_chunk_size`); a decoder without
            one runs the whole prompt at once (a chunk would recompute everything before it).

    Returns:
        For a tensor: [batch, seq + steps] like Hugging Face (the prompt as given, then the generated tokens, pad
        after a sequence's EOS; generation stops when every sequence has ended). For lists: each prompt followed by
        its own generated tokens (up to and including its EOS).

    Raises:
        GenerationError: bad arguments, before anything is computed.
    """
    vocab = decoder.vocab_size
    sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
    check_int("max_new_tokens", max_new_tokens, 0)
    prompts = _prompts(input_ids, attention_mask, vocab)
    eos = _token_set("eos_token_id", eos_token_id, vocab)
    pad = _token_set("pad_token_id", pad_token_id, vocab)
    pad_id = pad[0] if pad else (eos[0] if eos else 0)
    lengths_list = [len(prompt) for prompt in prompts.tokens]
    longest = max(lengths_list)
    max_seq = decoder.max_seq
    if max_seq is not None and longest + max_new_tokens > max_seq:
        raise GenerationError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} "
            f"exceeds the KV cache's max_seq {max_seq}; compile with kv-cache{{max_seq={longest + max_new_tokens}}}"
        )
    if prefill_chunk is None:
        prefill_chunk = prefill_chunk_size(len(lengths_list), vocab)
    check_int("prefill_chunk", prefill_chunk, 1)
    if max_seq is None:
        prefill_chunk = longest
    if streamer is not None:
        streamer.put(_padded_prompts(prompts, pad_id).cpu())
    generated = _decode(
        decoder, prompts.tokens, max_new_tokens, sampling, eos, pad_id, streamer, share_tokens, prefill_chunk
    )
    if streamer is not None:
        streamer.end()
    if prompts.padded is None:
        return [prompt + _until_eos(row, eos) for prompt, row in zip(prompts.tokens, generated.tolist())]
    return torch.cat([prompts.padded, generated.to(prompts.padded)], dim=1)


def _padded_prompts(prompts: Prompts, pad_id: int) -> torch.Tensor:
    if prompts.padded is not None:
        return prompts.padded
    longest = max(len(prompt) for prompt in prompts.tokens)
    return torch.tensor([[pad_id] * (longest - len(prompt)) + prompt for prompt in prompts.tokens], dtype=torch.int64)


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    for index, token in enumerate(row):
        if token in eos:
            return row[: index + 1]
    return row


@torch.no_grad()
def _decode(
    decoder: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    eos: list[int],
    pad_id: int,
    streamer: Any,
    share_tokens: Callable[[torch.Tensor], torch.Tensor] | None,
    prefill_chunk: int,
) -> torch.Tensor:
    """The generated tokens [batch, steps] (pad after EOS): prefill, then one decode step per token."""
    device = decoder.device
    batch = len(prompts)
    lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.int64, device=device)
    if max_new_tokens == 0:
        return torch.zeros((batch, 0), dtype=torch.int64, device=device)
    longest = max(len(prompt) for prompt in prompts)
    # Right padding with a valid id: padded slots are computed, then overwritten by each sequence's decode steps.
    ids = torch.tensor([prompt + [pad_id] * (longest - len(prompt)) for prompt in prompts], dtype=torch.int64)
    generator = None
    if sampling.do_sample and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    eos_ids = torch.tensor(eos, dtype=torch.int64, device=device)
    session = decoder.new_session(batch)
    last = _prefill(session, ids.to(device), lengths, prefill_chunk)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    columns: list[torch.Tensor] = []
    positions = lengths.clone()
    for step in range(max_new_tokens):
        if last is None:
            tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        else:
            tokens = choose_tokens(last, sampling, generator).to(device, torch.int64)
        if share_tokens is not None:
            tokens = share_tokens(tokens)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        columns.append(tokens)
        if eos:
            finished |= torch.isin(tokens, eos_ids)
        more = step + 1 < max_new_tokens
        if more:
            # The next step is enqueued before the host reads this step's tokens (the streamer, the EOS check), so
            # its launch overlaps the GPU's work on this one instead of waiting for it (a CUDA-graph launch of the
            # full model takes ~0.17 ms of host time, BENCHMARKS.md). When every sequence has just ended, that one
            # step is computed for nothing.
            logits = session.step(tokens[:, None], positions)
            last = None if logits is None else logits[:, -1]
            positions = positions + 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if not more or (eos and bool(finished.all())):
            break
    return torch.stack(columns, dim=1)


def _prefill(
    session: DecodeSession, ids: torch.Tensor, lengths: torch.Tensor, chunk: int
) -> torch.Tensor | None:
    """Runs the right-padded prompts [batch, longest] in chunks of `chunk` positions; returns the logits [batch,
    vocab] at each sequence's own last real token (None where this process holds no logits)."""
    batch, longest = ids.shape
    last_index = lengths - 1
    last: torch.Tensor | None = None
    for start in range(0, longest, chunk):
        stop = min(start + chunk, longest)
        position = torch.full((batch,), start, dtype=torch.int64, device=ids.device)
        logits = session.step(ids[:, start:stop], position)
        if logits is None:
            continue
        if logits.shape[1] != stop - start:
            # A program narrowed to its last position (`logits-for{positions=last}`) has each prompt's next-token
            # logits only when every prompt ends at the batch's last slot.
            if logits.shape[1] != 1 or bool((lengths != longest).any()):
                raise GenerationError(
                    "this program returns logits for the last position only (logits-for{positions=last}); prompts "
                    "of different lengths need every position: compile with logits-for{positions=all}"
                )
            last = logits[:, 0]
            continue
        index = (last_index - start).clamp(0, stop - start - 1).to(logits.device)
        picked = logits[torch.arange(batch, device=logits.device), index]
        inside = ((last_index >= start) & (last_index < stop)).to(logits.device)[:, None]
        last = picked.clone() if last is None else torch.where(inside, picked, last)
    return last


def prefill_chunk_size(batch: int, vocab: int, budget_bytes: int = PREFILL_LOGITS_BUDGET) -> int:
    """Positions per prefill step, so that one step's float32 logits [batch, chunk, vocab] stay within the budget
    (every position's logits are computed: 64 prompts of 4096 tokens over a 32000-token vocabulary would be 33 GB)."""
    return max(1, budget_bytes // (batch * vocab * 4))
