"""Qwen-1.8B-Chat as a transformers (5.x) model, written from the math of the published model.

Checkpoint-compatible with the published weights (the published names and shapes). Reads bottom-up:
RMSNorm -> rotary -> attention -> MLP -> block -> model -> LM head.

Differences from Qwen's own remote code, all deliberate: attention always runs through
torch's scaled_dot_product_attention with one explicit mask that combines causality and padding (the original lost
the causal mask whenever an attention_mask was passed); rotary embeddings follow `position_ids` (the original
ignored them, so left-padded batches generated from shifted positions); the KV cache is transformers' Cache API;
precision is the caller's `dtype`, never chosen from the hardware.

Besides `forward` (training, scoring, transformers' `generate`), the model has the cached forward of the batched
engine (medextract/engine.py), through the same blocks, attention, rotary and norms: a `RowKVCache` holds
independent sequences in its rows, `prefill` writes a prompt's keys and values into a row, and `decode_step` feeds
every row one token at its own position and returns the next-token logits.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin, LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_qwen import QWenConfig
from .qwen_generation_utils import StopWordsLogitsProcessor, decode_tokens, get_stop_words_ids, make_context


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back, then scale (the order matters for bf16 parity)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding, with dynamic NTK scaling
# ---------------------------------------------------------------------------------------------------------------


def ntk_alpha_for(length: int, seq_length: int) -> float:
    """Dynamic-NTK alpha: 1 up to seq_length, then 3 up to 2x, 7 up to 4x, ... (2^ceil(log2(L/seq)+1) - 1)."""
    context = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context) - 1, 1))


class RotaryEmbedding(nn.Module):
    """Split-halves rotary tables (cat(freqs, freqs)) for explicit positions, one base per sample."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base
        self.register_buffer("inv_freq", self._inv_freq(1.0), persistent=False)

    def _inv_freq(self, ntk_alpha: float, device=None) -> torch.Tensor:
        base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(self, position_ids: torch.Tensor, ntk_alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T); returns cos, sin of shape (B, T, 1, dim) in fp32
        device = position_ids.device
        if all(a == 1.0 for a in ntk_alphas):
            # the buffer, unless model.half() / .bfloat16() rounded it: then rebuilt in fp32
            exact = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._inv_freq(1.0)
            inv_freq = exact.to(device)[None, :]  # (1, dim/2)
        else:
            inv_freq = torch.stack([self._inv_freq(a, device) for a in ntk_alphas])  # (B or 1, dim/2)
        freqs = position_ids.float()[:, :, None] * inv_freq[:, None, :]  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, dim)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # t (B, T, H, D); only the first cos.shape[-1] channels rotate (rotary_pct < 1 leaves the rest as they are)
    rot_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rot_dim].float(), t[..., rot_dim:]
    t_rot = t_rot * cos + rotate_half(t_rot) * sin
    return torch.cat((t_rot.type_as(t), t_pass), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------------------------


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)  # the one Linear with a bias
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)
        self.c_proj._is_residual_proj = True
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.dropout = config.attn_dropout_prob
        self.use_logn_attn = config.use_logn_attn
        self.seq_length = config.seq_length

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                past_key_values: Cache | None) -> torch.Tensor:
        """`past_key_values`: a transformers Cache or a RowKVCache view; its `update` stores this call's keys and
        values and returns every key and value the queries attend over, masked by `mask` (True = may attend)."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.projection_size, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.num_heads, self.head_dim)
        v = v.view(B, T, self.num_heads, self.head_dim)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, H, S, D)
        S = k.shape[2]
        if self.use_logn_attn and not self.training and S > self.seq_length:
            # LogN scaling: a query at 1-based key position i > seq_length is multiplied by log_seq_length(i)
            pos = torch.arange(S - T + 1, S + 1, device=q.device, dtype=torch.float32)
            logn = torch.where(pos > self.seq_length, torch.log(pos) / math.log(self.seq_length), 1.0)
            q = (q.float() * logn[None, None, :, None]).type_as(q)

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1, scale=self.scale)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.projection_size)
        return self.c_proj(out)


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)  # linear ("up") branch
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)  # gated branch: SiLU goes here
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)
        self.c_proj._is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), rotary, mask, past_key_values)
        return h + self.mlp(self.ln_2(h))


# ---------------------------------------------------------------------------------------------------------------
# The row cache: sequences side by side, for batched generation
# ---------------------------------------------------------------------------------------------------------------


class RowKVCache:
    """Per layer, keys and values of shape (rows, heads, capacity, head_dim), written in place. Row r holds one
    sequence's tokens at slots 0, 1, ... (no padding), so rows of different lengths decode together; `step_view` and
    `prefill_view` are what the attention layers write into and read from. Also cos and sin of every slot (`cos`,
    `sin`: (capacity, 1, rot_dim), computed by the model's RotaryEmbedding), which a decoding step looks up instead of
    computing: the capacity never exceeds seq_length, where dynamic NTK's alpha is 1. Made by
    `QWenLMHeadModel.row_cache`."""

    def __init__(self, layers: int, rows: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, rotary: tuple[torch.Tensor, torch.Tensor]):
        shape = (rows, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.cos, self.sin = rotary

    def move_row(self, source: int, target: int) -> None:
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target].copy_(layer[source])

    def snapshot(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of slots 0..length-1 of `row`, per layer (keys, values) of shape (heads, length, head_dim)."""
        return [(k[row, :, :length].clone(), v[row, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    def restore(self, row: int, saved: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Slots 0..length-1 of `row` from a snapshot (of at least `length` slots)."""
        for layer, (keys, values) in enumerate(saved):
            self.keys[layer][row, :, :length] = keys[:, :length]
            self.values[layer][row, :, :length] = values[:, :length]

    def step_view(self, positions: torch.Tensor, width: int) -> "RowStepView":
        return RowStepView(self, positions, width)

    def prefill_view(self, row: int, start: int) -> "RowPrefillView":
        return RowPrefillView(self, row, start)


class RowStepView:
    """One decoding step of rows 0..A-1: each row's new key and value go to its own slot; attention reads slots
    0..width-1 of every row (row_attention_mask hides what a row does not own)."""

    def __init__(self, cache: RowKVCache, positions: torch.Tensor, width: int):
        self.cache, self.positions, self.width = cache, positions, width
        self.rows = torch.arange(len(positions), device=positions.device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        count = len(self.positions)
        k_buf, v_buf = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        k_buf[self.rows, :, self.positions] = keys[:, :, 0]  # keys (A, H, 1, D)
        v_buf[self.rows, :, self.positions] = values[:, :, 0]
        return k_buf[:count, :, :self.width], v_buf[:count, :, :self.width]  # (A, H, width, D)


class RowPrefillView:
    """One row's tokens after the slots already filled (`length`): appended in place, attended causally. It is also
    a transformers Cache as far as `forward` asks (`update`, `get_seq_length`)."""

    def __init__(self, cache: RowKVCache, row: int, length: int):
        self.cache, self.row, self.length = cache, row, length

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        end = self.length + keys.shape[2]
        k_buf, v_buf = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        k_buf[self.row, :, self.length:end] = keys[0]  # keys (1, H, T, D)
        v_buf[self.row, :, self.length:end] = values[0]
        return k_buf[self.row:self.row + 1, :, :end], v_buf[self.row:self.row + 1, :, :end]  # (1, H, end, D)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_is_residual_proj", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module._inv_freq(1.0, module.inv_freq.device))


def build_attention_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True = may attend: causal, offset by the cache, and not onto padding.

    None means plain causal attention with nothing cached, which SDPA handles itself.
    """
    kv_len = past_len + q_len
    padded = attention_mask is not None and not bool(attention_mask[:, -kv_len:].all())
    if not padded and past_len == 0:
        return None
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, kv_len)  # (B, 1, T, S)
    if padded:
        mask = mask & attention_mask[:, None, None, -kv_len:].bool()
        # A padding query may see nothing at all; let it see everything so SDPA returns numbers, not NaN
        # (its output is never used: padding keys are masked for every real query).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def row_attention_mask(positions: torch.Tensor, width: int) -> torch.Tensor:
    """Boolean (A, 1, 1, width) mask of one decoding step over a RowKVCache, True = may attend: row i's query, at
    slot positions[i], sees its own slots 0..positions[i]; the slots after it hold nothing of this row's."""
    slots = torch.arange(width, device=positions.device)
    return (slots[None, :] <= positions[:, None])[:, None, None, :]


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        rot_dim = int(config.kv_channels * config.rotary_pct)
        self.rotary_emb = RotaryEmbedding(rot_dim, base=config.rotary_emb_base)
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._ntk_alphas: list[float] = [1.0]  # chosen at prefill, reused while decoding (as Qwen does)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _choose_ntk_alphas(self, attention_mask: torch.Tensor | None, kv_len: int, past_len: int) -> list[float]:
        if self.training or not self.config.use_dynamic_ntk:
            return [1.0]
        if past_len > 0:
            return self._ntk_alphas
        seq_length = self.config.seq_length
        if attention_mask is not None and kv_len > seq_length:
            true_lens = attention_mask[:, -kv_len:].sum(dim=-1).tolist()
            alphas = [ntk_alpha_for(int(n), seq_length) for n in true_lens]
        else:
            alphas = [ntk_alpha_for(kv_len, seq_length)]
        self._ntk_alphas = alphas
        return alphas

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        B, T, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if not use_cache:
            past_key_values = None
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        device = inputs_embeds.device
        if position_ids is None:
            if attention_mask is not None:
                # count real tokens only, so left padding does not shift positions
                full = attention_mask[:, -(past_len + T):].long()
                position_ids = (full.cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=device)[None, :].expand(B, T)
        position_ids = position_ids.to(device)
        if position_ids.shape[0] != B:
            position_ids = position_ids.expand(B, -1)

        alphas = self._choose_ntk_alphas(attention_mask, past_len + T, past_len)
        rotary = self.rotary_emb(position_ids, alphas)
        mask = build_attention_mask(attention_mask, B, T, past_len, device)

        x, hidden_states = self.forward_blocks(inputs_embeds, rotary, mask, past_key_values, use_cache,
                                               output_hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values,
                                       hidden_states=hidden_states)

    def forward_blocks(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                       cache=None, use_cache: bool = False,
                       output_hidden_states: bool | None = False) -> tuple[torch.Tensor, tuple | None]:
        """Embeddings (B, T, hidden) through the blocks and the final norm: what `forward` and the cached forward
        (`QWenLMHeadModel.prefill`, `decode_step`) share. `cache`: a transformers Cache, or a RowKVCache's view."""
        x = self.drop(x)
        hidden_states = () if output_hidden_states else None
        for block in self.h:
            if output_hidden_states:
                hidden_states += (x,)
            x = block(x, rotary, mask=mask, past_key_values=cache, use_cache=use_cache)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden_states += (x,)
        return x, hidden_states


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # ---- the cached forward of batched generation: a RowKVCache, its rows and their positions passed in ----

    def row_cache(self, rows: int, capacity: int) -> RowKVCache:
        """An empty RowKVCache of `rows` sequences of up to `capacity` tokens, in the dtype and on the device of the
        model's parameters."""
        config = self.config
        if capacity > config.seq_length:  # past it, dynamic NTK would change the rotary tables as a row grows
            raise ValueError(f"a row cache holds at most seq_length ({config.seq_length}) tokens, not {capacity}")
        parameter = next(self.parameters())
        with torch.no_grad():
            slots = torch.arange(capacity, device=parameter.device)[None, :]
            cos, sin = (t[0] for t in self.transformer.rotary_emb(slots, [1.0]))  # (capacity, 1, rot_dim)
        return RowKVCache(config.num_hidden_layers, rows, config.num_attention_heads, capacity, config.kv_channels,
                          parameter.dtype, parameter.device, (cos, sin))

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: RowKVCache, row: int, start: int) -> None:
        """Keys and values of `ids` (T,) at slots start..start+T-1 of `row`, whose slots before `start` already hold
        the sequence's earlier tokens. No logits: the engine feeds a prompt's last token in its first decoding
        step."""
        T = ids.shape[0]
        positions = torch.arange(start, start + T, device=ids.device)[None, :]  # (1, T)
        rotary = self.transformer.rotary_emb(positions, [1.0])  # (1, T, 1, rot_dim) each; alpha 1 (row_cache)
        mask = build_attention_mask(None, 1, T, start, ids.device)  # causal, offset by the slots before
        x = self.transformer.wte(ids[None, :])  # (1, T, hidden)
        self.transformer.forward_blocks(x, rotary, mask, cache.prefill_view(row, start))

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: RowKVCache,
                    width: int) -> torch.Tensor:
        """Next-token logits (A, vocab) in fp32 of rows 0..A-1 of `cache`, fed tokens (A,) at slots positions (A,):
        each row attends to its own slots up to its position. `width` (above every position, at most the capacity)
        is how many slots attention reads: the slots in use, or a fixed bucket, the static shapes a CUDA graph
        needs."""
        x = self.transformer.wte(tokens[:, None])  # (A, 1, hidden)
        rotary = (cache.cos[positions][:, None], cache.sin[positions][:, None])  # (A, 1, 1, rot_dim)
        mask = row_attention_mask(positions, width)  # (A, 1, 1, width)
        x, _ = self.transformer.forward_blocks(x, rotary, mask, cache.step_view(positions, width))
        return self.lm_head(x[:, -1]).float()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int = 0, skip_logits: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """`skip_logits=True` (training) computes the loss from the labelled positions only and returns no logits:
        the same loss, without the (B, T, vocab) fp32 logits that dominate memory when few tokens are labelled."""
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        loss, logits = None, None
        if labels is not None and skip_logits:
            shift_labels = labels[:, 1:].to(hidden.device)
            keep = shift_labels != -100
            loss = F.cross_entropy(self.lm_head(hidden[:, :-1][keep]).float(), shift_labels[keep])
        else:
            if logits_to_keep:  # generation needs only the last position's logits
                hidden = hidden[:, -logits_to_keep:]
            logits = self.lm_head(hidden)
        if labels is not None and loss is None:
            # position t predicts token t+1; labels are unshifted, -100 is ignored; mean over all labelled tokens
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 logits_processor: LogitsProcessorList | None = None, stop_words_ids: list[list[int]] | None = None,
                 **kwargs):
        """transformers' generate, plus Qwen's `stop_words_ids` (from the call, else generation_config's): once a
        row's output ends with one of these token sequences, eos is forced on the next step."""
        config = generation_config or self.generation_config
        stop_words_ids = stop_words_ids if stop_words_ids is not None else getattr(config, "stop_words_ids", None)
        if stop_words_ids:
            eos = kwargs.get("eos_token_id", config.eos_token_id)
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            if eos is None:
                raise ValueError("stop_words_ids needs an eos_token_id to force")
            logits_processor = LogitsProcessorList(logits_processor or [])
            logits_processor.append(StopWordsLogitsProcessor(stop_words_ids, int(eos)))
        return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                **kwargs)

    @torch.no_grad()
    def chat(self, tokenizer, query: str, history: list[tuple[str, str]] | None = None,
             system: str = "You are a helpful assistant.", stop_words_ids: list[list[int]] | None = None,
             generation_config: GenerationConfig | None = None, **kwargs) -> tuple[str, list[tuple[str, str]]]:
        """One ChatML turn: build the prompt from history, generate until <|im_end|> (or one of `stop_words_ids`),
        return (response, history)."""
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        if getattr(generation_config, "chat_format", "chatml") != "chatml":
            raise ValueError("chat() supports the chatml format only")
        history = list(history or [])
        max_window_size = kwargs.pop("max_window_size", getattr(generation_config, "max_window_size", 6144))
        raw_text, context_tokens = make_context(tokenizer, query, history=history, system=system,
                                                max_window_size=max_window_size)
        stop_ids = [ids[0] for ids in get_stop_words_ids("chatml", tokenizer)] + [tokenizer.eod_id]
        model_kwargs = generation_config.update(eos_token_id=stop_ids, pad_token_id=tokenizer.eod_id, **kwargs)
        input_ids = torch.tensor([context_tokens], device=self.device)
        output = self.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                               generation_config=generation_config, stop_words_ids=stop_words_ids, **model_kwargs)
        response = decode_tokens(output[0], tokenizer, raw_text_len=len(raw_text),
                                 context_length=len(context_tokens), errors="replace")
        history.append((query, response))
        return response, history
