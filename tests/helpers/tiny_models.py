"""Tiny random decoders of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHITECTURES: dict[str, tuple[type, type, dict]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM, {}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 4}),
}


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random causal LM of ``arch`` in eval mode (dropout off)."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return model_cls(config).to(dtype).eval()


def tiny_model_for(tokenizer, arch: str = "llama"):
    """:func:`tiny_model` sized to ``tokenizer``: its vocabulary and its pad, bos and eos ids."""
    return tiny_model(
        arch,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def randomize_adapter(model, seed: int = 0, scale: float = 0.5) -> None:
    """Give every adapter (``deltamem_``) weight a non-trivial random value so that memory effects are visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "deltamem_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def random_ids(batch: int, length: int, *, seed: int = 1) -> torch.Tensor:
    """Token ids that avoid the special ids 0-2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def qwen3_4b_on_meta():
    """Qwen3-4B's geometry on the meta device (no weights): 36 layers, hidden 2560, 32 heads × 128, 8 KV heads."""
    config = tf.Qwen3Config(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        return tf.Qwen3ForCausalLM(config)
