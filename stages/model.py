"""LLaMA model shapes and FLOP accounting. transformers is imported only where a model is built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int       # ~8/3 x hidden, rounded, as LLaMA's SwiGLU
    max_positions: int
    tie_embeddings: bool    # small models spend too much of their budget on a second matrix


PRESETS: dict[str, Shape] = {
    # tiny: the stage tests; a forward pass in milliseconds.
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, max_positions=128,
                  tie_embeddings=True),
    # demo: the CPU demo; learns real structure from a few million tokens in minutes on 2 cores.
    "demo": Shape(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512,
                  max_positions=256, tie_embeddings=True),
    # GPU shapes; 125m/350m follow GPT-3's table, 1b TinyLlama's, 7b LLaMA-1's.
    "125m": Shape(768, 12, 12, 12, 2048, 1024, True),
    "350m": Shape(1024, 24, 16, 16, 2816, 1024, True),
    "1b": Shape(2048, 22, 32, 4, 5632, 2048, False),
    "7b": Shape(4096, 32, 32, 32, 11008, 4096, False),
}

# Dense bf16 peak per device (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12,
                   "L4": 121e12, "4090": 165e12}


def llama_config(preset: str, vocab_size: int, tokenizer=None, max_positions: int | None = None):
    from transformers import LlamaConfig
    s = PRESETS[preset]
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate, max_position_embeddings=max_positions or s.max_positions,
        tie_word_embeddings=s.tie_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None))


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding
    (a lookup costs nothing; a tied embedding is also the LM head, which is a matmul)."""
    n = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention (PaLM, App. B)."""
    return 6 * n_params + 12 * layers * hidden * seq_len


def device_peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None
