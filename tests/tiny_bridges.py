"""Tiny TransformerBridges booted from Hugging Face with random weights, for tests: GPT-2 (learned positions),
Llama (rotary, grouped-query attention) and Gemma-2 (soft caps, a sliding window of 4), on a word-level
tokenizer of ``V`` tokens (``w0`` .. ``w{V-1}``; 1, 2, 3 are BOS, EOS and padding)."""

from __future__ import annotations

import warnings

V = 50


def word_tokenizer(folder):
    import tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", bos_token="w1", eos_token="w2",
                            pad_token="w3").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)  # TransformerLens reloads it from its name_or_path


def tiny_bridge(kind: str, folder, n_layers: int = 2):
    """A ``kind`` ("gpt2", "llama" or "gemma2") bridge of ``n_layers`` blocks (d_model 32, 4 heads, 2 key/value
    heads where the family has them), its tokenizer saved in ``folder``."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if kind == "gpt2":
        hf, name = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, n_positions=64, **ids)), "gpt2"
    elif kind == "llama":
        hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, **ids))
        name = "meta-llama/Llama-3.2-1B"
    else:
        hf = Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                            max_position_embeddings=64, sliding_window=4, **ids))
        name = "google/gemma-2-2b"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(name, hf_model=hf.eval(), tokenizer=word_tokenizer(folder),
                                                   device="cpu")
