"""GPT-2 in one file: config, KV cache, the modules from small to large, then `GPT`.

Parameter names match Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`, ...)
so that weights move between the two with a transpose and nothing else: HF stores its projections
as `Conv1D` (in, out) matrices, we use plain `nn.Linear` (out, in). See `core/hf.py` for the mapping.

GPT-1 (HF's `openai-gpt`) is the same model with three config switches: LayerNorm after each
residual add instead of before each sublayer, no final LayerNorm, and a 512-token context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.cross_entropy import linear_cross_entropy
from core.errors import UserError

# The four OpenAI GPT-2 sizes (Radford et al. 2019, table 2); all use block_size 1024.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (HF: n_positions)
    vocab_size: int = 50257  # real tokens; logits past them (the padding) are -inf
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd, as in GPT-2
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    # Embedding rows, and the head's, are padded up to a multiple of this (50257 -> 50304 for 64,
    # build-nanogpt's GPU-friendly width); the padded ids are never predicted (see GPT.logits).
    vocab_multiple: int = 1
    # GPT-1's block: LayerNorm after each residual add (x = ln(x + f(x))) instead of before each
    # sublayer (x = x + f(ln(x))), and no LayerNorm after the last block.
    post_ln: bool = False
    final_ln: bool = True
    # "tanh": the approximation of GPT-2, of OpenAI's GPT-1 code and of HF's openai-gpt (whose "gelu"
    # is gelu_new); "erf": the exact GELU, HF's activation_function "gelu" for GPT-2 configs.
    gelu: str = "tanh"

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise UserError(f"model config: n_inner must be a positive integer or null, got {self.n_inner!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        if self.gelu not in ("tanh", "erf"):
            raise UserError(f"model config: gelu must be 'tanh' or 'erf', got {self.gelu!r}")

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"model config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**values)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Rows of a batch advance together: `pos` is the number of positions already cached, and
    `GPT.hidden_states` moves it on after every layer has written its slice. By default `pos` is a
    Python int and attention reads exactly the positions cached so far. A static cache keeps every
    shape the same from step to step, which a compiled decode step (and a CUDA graph) needs, as in
    gpt-fast: `pos` is a tensor on the device, new keys and values are written at it, and attention
    reads all `max_len` positions under a mask that hides those not written yet. The cache's `dtype`
    may be wider than the model's: the new keys and values are widened as they are written, and
    attention runs in that dtype.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 static: bool = False) -> None:
        if max_len > config.block_size:
            raise UserError(f"KV cache of {max_len} positions exceeds block_size {config.block_size}")
        # One tensor per layer, not views of one: a compiled step then writes each in place, where
        # a write through a view of a shared base becomes a copy of the whole base at every layer.
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.static = static
        self.pos: int | torch.Tensor = torch.zeros((), dtype=torch.long, device=device) if static else 0
        if static:  # buffers that a compiled step (a CUDA graph) updates in place, at fixed addresses
            for buffer in (*self.k, *self.v, self.pos):
                torch._dynamo.mark_static_address(buffer)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys and values; return the cached ones for `layer`: those
        so far, or all max_len of a static cache.

        Keys and values of a single row (B = 1) go to every row: a prompt shared by all the samples
        of a batch is prefilled once. The result has as many rows as the input.
        """
        k_cache, v_cache = self.k[layer], self.v[layer]  # (B, nh, max_len, hs)
        if self.static:
            index = self.pos + torch.arange(k.size(2), device=k.device)
            k_cache[:, :, index] = k.to(k_cache.dtype)  # broadcasts a single row; index_put_ does not cast
            v_cache[:, :, index] = v.to(v_cache.dtype)
            return k_cache[: k.size(0)], v_cache[: k.size(0)]
        end = self.pos + k.size(2)
        k_cache[:, :, self.pos:end] = k
        v_cache[:, :, self.pos:end] = v
        return k_cache[: k.size(0), :, :end], v_cache[: k.size(0), :, :end]

    def attention_mask(self, length: int) -> torch.Tensor | None:
        """For a static cache, (length, max_len): True where the queries of the next `length`
        positions may attend (keys up to their own position). None otherwise: attention reads
        just the cached slice, which needs no such mask."""
        if not self.static:
            return None
        positions = self.pos + torch.arange(length, device=self.pos.device)
        return torch.arange(self.max_len, device=self.pos.device) <= positions.unsqueeze(1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, S, hs), S = cached + T
        S = k.size(2)
        # Four cases: an explicit mask (packed sequences) is used as given; a full causal pass
        # (training, or a prefill into an empty cache) lets SDPA pick its fused causal kernel; one
        # new token attends to everything cached, so needs no mask; a chunk after a non-empty cache
        # needs the causal mask shifted by the cached length.
        mask, is_causal = attn_mask, False
        if mask is None and S == T:
            is_causal = T > 1
        elif mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        # Attention runs in the dtype of the keys and values: a KV cache may keep them wider than the
        # model computes (float32 under bfloat16 autocast), and then the queries are widened to match.
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.to(q.dtype).transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_ln = config.post_ln
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_ln:  # GPT-1
            x = self.ln_1(x + self.attn(x, kv_cache, attn_mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            # GPT-1 has no final LayerNorm: an Identity keeps the forward pass one path, and holds no weights.
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon) if config.final_ln else nn.Identity(),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(N), N = 2 residual adds per layer.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, padded_vocab_size), None), or, given targets (B, T),
        (None, the mean cross-entropy over the targets that are not -1). The loss never holds all
        the logits at once (see core/cross_entropy.py); `logits(hidden_states(idx))` gives them.
        See `hidden_states` for the other arguments."""
        hidden = self.hidden_states(idx, kv_cache, positions, attn_mask)
        if targets is None:
            return self.logits(hidden), None
        return None, self.loss(hidden, targets)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> the last hidden states (B, T, C) after the final LayerNorm, the input of the head.

        With a cache, idx continues the cached positions. Packed inputs, several sequences sharing
        one row, pass their own `positions` (B, T) and a boolean `attn_mask` (B, 1, T, T), True
        where a query may attend to a key; by default positions count up and attention is causal.
        Callers that need logits at only a few positions apply `logits` to just those rows: the
        head is the largest single matmul of a small GPT.
        """
        T = idx.size(1)
        if (positions is None) != (attn_mask is None) or (attn_mask is not None and kv_cache is not None):
            raise ValueError("positions and attn_mask go together, and not with a KV cache")
        start = kv_cache.pos if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.config.block_size
        if positions is None and isinstance(start, int) and start + T > limit:  # (a static cache's is a tensor)
            raise ValueError(f"sequence of {start + T} positions exceeds the limit of {limit}")
        if positions is None:
            positions = start + torch.arange(T, dtype=torch.long, device=idx.device)
        if kv_cache is not None:
            attn_mask = kv_cache.attention_mask(T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., padded_vocab_size) logits, -inf at the padded ids, so that
        no softmax, sampling or scoring ever gives them any probability. Slice [..., :vocab_size]
        where exactly the vocabulary's width is needed."""
        # The head multiplies by all its padded rows: on GPUs a GEMM 50,304 wide runs faster than one
        # 50,257 wide (build-nanogpt measured it), which is what the padding is for.
        logits = self.lm_head(hidden)
        logits[..., self.config.vocab_size:] = float("-inf")
        return logits

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of `logits(hidden)` (..., C) against `targets` (...), skipping
        targets of -1, in float32 whatever the dtype; without ever holding all the logits."""
        return linear_cross_entropy(hidden.flatten(0, -2), self.lm_head.weight, targets.flatten(),
                                    self.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    @contextmanager
    def evaluating(self) -> Iterator[GPT]:
        """Eval mode (no dropout) for the duration, then back to the mode the caller had: what
        generation and evaluation need when the training loop calls them mid-run."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def num_params(self) -> int:
        """Parameter count, the tied head counted once (the convention of the GPT-2 size names)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
        """The model named by `spec`, in eval mode: `GPT.from_pretrained("gpt2")` (an HF hub name), an HF
        model folder, or one of our checkpoint folders. See `core.pretrained.load_model`, which also
        returns the model's tokenizer."""
        from core.pretrained import load_model  # imported here: core.pretrained imports this module

        return load_model(spec, device=device, dtype=dtype)[0]

    def with_settings(self, vocab_multiple: int, dropout: float) -> GPT:
        """This model's weights under new training settings: embedding rows padded to a multiple of
        `vocab_multiple` (50257 -> 50304 for 64; the new rows are zero, never an input, and their
        logits are -inf) and another dropout rate (HF's gpt2 configs say 0.1)."""
        config = replace(self.config, vocab_multiple=vocab_multiple, dropout=dropout)
        weights = {key: value for key, value in self.state_dict().items() if key != "lm_head.weight"}
        wte = weights["transformer.wte.weight"][: config.vocab_size]
        padding = wte.new_zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)
        weights["transformer.wte.weight"] = torch.cat([wte, padding])
        return GPT.from_state_dict(config, weights).train(self.training)

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state_dict: dict[str, torch.Tensor]) -> GPT:
        """Build a model holding exactly these weights, or fail naming every key that does not fit.

        `state_dict` is in our layout: the keys of `GPT(config).state_dict()`, nn.Linear weights, the
        tied `lm_head.weight` optional. Files of other layouts (HF's, a DDP or compiled wrapper's) go
        through core/weights.py first.
        """
        state_dict = dict(state_dict)
        with torch.device("meta"):
            model = cls(config)  # no memory, no random init: every tensor comes from state_dict
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name != "lm_head.weight"}
        if "lm_head.weight" in state_dict:
            head = state_dict.pop("lm_head.weight")
            wte = state_dict.get("transformer.wte.weight")
            if wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
                raise UserError("lm_head.weight differs from transformer.wte.weight: untied output "
                                "heads are not supported (GPT-2 ties them)")
        problems = []
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        misshaped = [f"{name}: expected {list(expected[name])}, got {list(state_dict[name].shape)}"
                     for name in sorted(set(expected) & set(state_dict))
                     if tuple(state_dict[name].shape) != expected[name]]
        if missing:
            problems.append(f"missing keys: {_abbreviate(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_abbreviate(unexpected)}")
        if misshaped:
            problems.append(f"misshaped keys: {_abbreviate(misshaped)}")
        if problems:
            raise UserError("weights do not fit the model config; " + "; ".join(problems))
        model.load_state_dict(state_dict, strict=False, assign=True)  # strictness checked above
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied Parameter
        return model


def _abbreviate(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")
