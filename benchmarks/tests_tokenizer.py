"""A word-level Hugging Face tokenizer built offline (no hub), for benchmarks that boot a bridge."""

from __future__ import annotations


def make(vocab_size: int):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", bos_token="w1", eos_token="w2", pad_token="w3")
    import tempfile

    from transformers import AutoTokenizer

    d = tempfile.mkdtemp(prefix="tvlens-bench-tokenizer-")  # kept: TransformerLens reloads from name_or_path
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)
