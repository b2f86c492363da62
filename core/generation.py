"""Text generation with a KV cache: prefill the prompt once, then decode one token per step for a
batch of samples. `stream_tokens` is the core that sample.py and the training loop both consume.

A decode step runs a few hundred small ops around its matmuls; `compiled=True` runs it as one
torch.compile'd graph over a static KV cache instead (gpt-fast's recipe), and on CUDA as a CUDA graph.
Compiling takes seconds to minutes: `compile_decode_step` does it ahead, on the cache that the
generation will then use, so that no tokens/s figure counts it.
"""

from __future__ import annotations

import codecs
import functools
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from core.devices import synchronize
from model import GPT, KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits. `greedy` ignores everything else."""

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0 (use greedy decoding for 0), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def candidates(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, V) logits -> the temperature-scaled logits of the tokens that may be drawn and their ids.

    With top-k or top-p the result is (B, k) sorted most likely first, with ids (B, k) into the
    vocabulary and -inf where top-p cut a token; without either it is the (B, V) logits and None.
    Drawing from k candidates instead of the whole vocabulary also makes sampling much cheaper.
    """
    logits = logits.float() / sampling.temperature
    vocab = logits.size(-1)
    if sampling.top_k is not None and sampling.top_k < vocab:
        logits, ids = torch.topk(logits, sampling.top_k, dim=-1)  # sorted, most likely first
    elif sampling.top_p is not None and sampling.top_p < 1:
        logits, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        return logits, None
    if sampling.top_p is not None and sampling.top_p < 1:
        probs = logits.softmax(dim=-1)
        # A token is cut when the tokens ranked above it reach top_p on their own: what stays is the
        # smallest set whose probability reaches top_p (the most likely token always stays).
        mass_above = probs.cumsum(dim=-1) - probs
        logits = logits.masked_fill(mass_above >= sampling.top_p, float("-inf"))
    return logits, ids


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next token ids, without a host sync."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    allowed_logits, ids = candidates(logits, sampling)
    choice = torch.multinomial(allowed_logits.softmax(dim=-1), num_samples=1, generator=generator)  # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def fit_to_context(prompt: list[int], max_new_tokens: int, block_size: int) -> tuple[list[int], int]:
    """Crop the prompt from the left and cap the new tokens so that both fit in block_size.

    The last new token is never fed back, so the model sees len(prompt) + max_new_tokens - 1 positions.
    """
    if max_new_tokens > block_size:
        warnings.warn(f"max_new_tokens {max_new_tokens} capped to block_size {block_size}", stacklevel=2)
        max_new_tokens = block_size
    room = block_size - max_new_tokens + 1
    if len(prompt) > room:
        warnings.warn(f"prompt of {len(prompt)} tokens cropped from the left to its last {room}, so that "
                      f"{max_new_tokens} new tokens fit in block_size {block_size}", stacklevel=2)
        prompt = prompt[-room:]
    return prompt, max_new_tokens


def decode_step(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """(B, T) tokens that continue the cached positions -> the (B, padded vocab) logits of the last one.

    Only the last position's logits are needed: running the head on the whole prompt would cost a
    (T, vocab) matmul for nothing."""
    return model.logits(model.hidden_states(idx, kv_cache=cache)[:, -1])


@functools.cache
def _compiled_decode_step(device_type: str) -> Callable[[GPT, torch.Tensor, KVCache], torch.Tensor]:
    # Shapes never change from step to step over a static cache, so one graph serves them all. On
    # CUDA, reduce-overhead replays it as a CUDA graph: a decode step of a few samples is mostly
    # kernel launches otherwise.
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    return torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)


def static_cache_length(positions: int, block_size: int) -> int:
    """The length of a static cache for `positions`: the next power of two from 64, at most
    block_size, so that prompts of any length share a handful of compiled graphs."""
    return min(block_size, max(64, 1 << (positions - 1).bit_length()))


# Each model's static caches, by rows, length, dtype and device: made once and reused, emptied for each
# generation. A compiled step guards on its cache tensors being the very same ones (a CUDA graph
# bakes in their addresses), so a fresh cache for every generation would mean compiling again.
_static_caches: weakref.WeakKeyDictionary[GPT, dict[tuple, KVCache]] = weakref.WeakKeyDictionary()


def static_cache(model: GPT, num_samples: int, positions: int) -> KVCache:
    """An empty static KV cache for `num_samples` rows and at least `positions` positions: stale
    keys and values from an earlier use are never read, as attention stops at the current position."""
    dtype, device = model.transformer.wte.weight.dtype, model.device
    length = static_cache_length(positions, model.config.block_size)
    caches = _static_caches.setdefault(model, {})
    key = (num_samples, length, dtype, device)
    if key not in caches:
        caches[key] = KVCache(model.config, num_samples, length, device=device, dtype=dtype, static=True)
    cache = caches[key]
    cache.pos.zero_()
    return cache


def cached_positions(prompt_length: int, max_new_tokens: int) -> int:
    """The positions a generation feeds through the model: the last new token is never fed back."""
    return prompt_length + max_new_tokens - 1


def compile_decode_step(model: GPT, num_samples: int, prompt_length: int, max_new_tokens: int) -> float:
    """Compile and warm up the decode step of such a generation, on the static cache it will use;
    the seconds it took (next to nothing once done for these shapes)."""
    if max_new_tokens < 2:
        return 0.0  # no decode step: the first new token comes from the prompt's (eager) prefill
    start = time.perf_counter()
    cache = static_cache(model, num_samples, cached_positions(prompt_length, max_new_tokens))
    step = _compiled_decode_step(model.device.type)
    with torch.inference_mode(), model.evaluating():  # as in stream_tokens: the graph guards on both
        idx = torch.zeros(num_samples, 1, dtype=torch.long, device=model.device)
        for _ in range(3):  # CUDA graphs are recorded on the second or third call
            step(model, idx, cache)
    synchronize(model.device)
    return time.perf_counter() - start


@torch.inference_mode()
def stream_tokens(model: GPT, prompt: list[int], num_samples: int, max_new_tokens: int, sampling: Sampling,
                  generator: torch.Generator | None = None, stop_token: int | None = None,
                  compiled: bool = False) -> Iterator[torch.Tensor]:
    """Yield the (num_samples,) next tokens at each step, on the model's device, in eval mode.

    The prompt must fit with the new tokens in block_size (see `fit_to_context`); it must not be
    empty (start from <|endoftext|> for unconditional samples). With `stop_token`, generation ends
    once every row has produced it; rows that finished earlier keep yielding `stop_token`.
    `compiled` decodes with the compiled step (see `compile_decode_step`); the prompt is prefilled eagerly.
    """
    if not prompt:
        raise ValueError("empty prompt: start from the <|endoftext|> token for unconditional samples")
    if max_new_tokens < 1:
        return
    positions = cached_positions(len(prompt), max_new_tokens)
    if positions > model.config.block_size:
        raise ValueError(f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed block_size "
                         f"{model.config.block_size}; see fit_to_context")
    device = model.device
    if compiled:
        cache = static_cache(model, num_samples, positions)
    else:
        cache = KVCache(model.config, num_samples, positions, device=device, dtype=model.dtype)
    step = _compiled_decode_step(device.type) if compiled else decode_step
    # The prompt is the same for every sample: prefill it once, at batch 1; KVCache.update copies
    # its keys and values into every row, and its logits serve every sample's first draw.
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    finished = torch.zeros(num_samples, dtype=torch.bool, device=device)
    with model.evaluating():
        for new_token in range(max_new_tokens):
            logits = (step if new_token else decode_step)(model, idx, cache)  # (1 or B, padded vocab)
            next_tokens = sample_next(logits.expand(num_samples, -1), sampling, generator)  # (B,)
            if stop_token is not None:
                next_tokens = next_tokens.masked_fill(finished, stop_token)
                finished |= next_tokens == stop_token
            yield next_tokens
            # One host sync every 16 steps is cheap; one per step would stall a GPU pipeline.
            if stop_token is not None and new_token % 16 == 15 and bool(finished.all()):
                return
            idx = next_tokens.unsqueeze(1)  # (B, 1)


def generate(model: GPT, prompt: list[int], num_samples: int, max_new_tokens: int, sampling: Sampling,
             generator: torch.Generator | None = None, stop_token: int | None = None,
             compiled: bool = False) -> list[list[int]]:
    """The new tokens of each sample (prompt excluded), cut after `stop_token` when given."""
    steps = list(stream_tokens(model, prompt, num_samples, max_new_tokens, sampling, generator, stop_token,
                               compiled))
    if not steps:
        return [[] for _ in range(num_samples)]
    rows = torch.stack(steps, dim=1).tolist()  # (B, steps)
    if stop_token is not None:
        rows = [row[: row.index(stop_token) + 1] if stop_token in row else row for row in rows]
    return rows


class TextStream:
    """Turns token ids into text as they arrive, holding back bytes of a half-finished UTF-8
    character (GPT-2's byte-level BPE splits many characters across tokens)."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
