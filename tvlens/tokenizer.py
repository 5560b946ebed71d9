"""A Hugging Face tokenizer over a tvlens token family's word vocabulary, built offline.

The synthetic families' prompts are whole words separated by spaces (``PromptSet.render``): ``dog red
three -> red ;``. ``word_tokenizer(vocab)`` is a ``transformers.PreTrainedTokenizerFast`` over a
word-level ``tokenizers`` model (split on whitespace, id = position in ``vocab``), so the shipped and
trained models get a ``model.tokenizer`` and TransformerLens' ``model.to_tokens`` /
``model.to_str_tokens`` / ``model.generate(..., stop_at_eos=False)`` work on them as on a pretrained model
(they have no end-of-text token: ``;`` ends an example but is never trained as an output)::

    model = tvlens.load_model("categories")
    model.to_tokens("dog red three -> ")       # tensor([[...]]), no BOS (these models have none)
    model.to_str_tokens(prompts.tokens[0])     # ['cat', 'red', ...]
"""

from __future__ import annotations

from typing import Any, Sequence

from tvlens.errors import ConfigError

UNKNOWN = "[UNK]"  # not in the vocabulary: encoding an unknown word raises, it never maps to a real token


def word_tokenizer(vocab: Sequence[str], pad_token: str | None = None) -> Any:
    """A ``PreTrainedTokenizerFast`` mapping each whitespace-separated word to its index in ``vocab``.

    ``pad_token`` (default: ``";"`` when the vocabulary has it, else its last word) pads batches of
    different lengths; no token is added, so ids stay ``0..len(vocab)-1`` as the model expects. Being the
    pad token, it is dropped where text is decoded with ``skip_special_tokens`` (``model.generate`` on a
    string returns the text without its ``;``; pass token ids to keep them)."""
    vocab = [str(w) for w in vocab]
    if not vocab or len(set(vocab)) != len(vocab) or any(not w or any(c.isspace() for c in w) for w in vocab):
        raise ConfigError("word_tokenizer: vocab must be distinct, non-empty words without whitespace")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad = pad_token if pad_token is not None else (";" if ";" in ids else vocab[-1])
    if pad not in ids:
        raise ConfigError(f"word_tokenizer: pad_token {pad!r} is not in the vocabulary")
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, padding_side="right",
                                  clean_up_tokenization_spaces=False)
    out.tvlens_word_tokenizer = True  # text families tokenize with their own word tokenizer, not this one
    return out


def attach_tokenizer(model, vocab: Sequence[str] | None) -> None:
    """Give ``model`` (a HookedTransformer over ``vocab``) ``model.tokenizer``; nothing when ``vocab`` is
    None (continuous families) or does not match the model's vocabulary size."""
    if vocab is None:
        return
    from tvlens.backends import get_backend

    if len(vocab) != int(get_backend(model).d_vocab):
        return
    old = getattr(model, "tokenizer", None)
    if getattr(old, "tvlens_word_tokenizer", False) and old.get_vocab() == {str(w): i for i, w in enumerate(vocab)}:
        return  # already this vocabulary's (a model reused for the next checkpoint of a run)
    model.tokenizer = word_tokenizer(vocab)
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        cfg.tokenizer_prepends_bos = False  # TransformerLens' to_tokens asks; the word tokenizer adds nothing


def family_vocab(family_config: dict | None) -> list[str] | None:
    """The word vocabulary of a token family's config (``model_info(model).family``), or None for
    continuous and text families, and for families not registered in this process."""
    if not family_config:
        return None
    from tvlens import tasks as _tasks
    from tvlens.errors import TvlensError

    try:
        fam = _tasks.from_config(family_config)
    except (TvlensError, TypeError, ValueError):
        return None
    if not isinstance(fam, _tasks.TokenTaskFamily):
        return None
    return list(fam.vocab)


__all__ = ["attach_tokenizer", "family_vocab", "word_tokenizer"]
