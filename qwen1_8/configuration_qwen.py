"""QWenConfig: the configuration of Qwen-1.8B-Chat. Defaults are the published 1.8B values, so a
config.json that omits a field (`seq_length`, say) still gives the real model; a published config.json loads unchanged.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    kv_channels: int = 128  # head dim; kv_channels * num_attention_heads == hidden_size
    intermediate_size: int = 11008  # twice the MLP width (each of w1, w2 is intermediate_size // 2 wide)
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    seq_length: int = 8192  # the trained context; dynamic NTK and logN scaling start beyond it
    scale_attn_weights: bool = True
    use_cache: bool = True
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    softmax_in_fp32: bool = False
    # Kept so published configs round-trip; precision is chosen by the caller's `dtype`, never from these flags,
    # and this implementation always uses torch's scaled_dot_product_attention.
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    use_flash_attn: bool | str = "auto"
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False
    onnx_safe: bool | None = None
    # Set by make_tiny, so every script that shows a random model's answers can say so (medextract.model_files)
    random_weights: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(f"kv_channels ({self.kv_channels}) x num_attention_heads ({self.num_attention_heads}) "
                             f"must equal hidden_size ({self.hidden_size})")
        if self.use_cache_quantization:
            raise ValueError("use_cache_quantization (8-bit KV cache with custom CUDA kernels) is not supported")
