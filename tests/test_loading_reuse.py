"""Loading a run's checkpoints into one model (``load_checkpoint(..., into=)``, what ``emergence`` does): the
same logits as a fresh load, on either TransformerLens line; a model of another shape is never reused."""

from __future__ import annotations

import torch

from tvlens.backends import get_backend
from tvlens.models import list_checkpoints, load_checkpoint


def test_weights_loaded_into_a_built_model_equal_a_fresh_load():
    ck = list_checkpoints("default")
    (_, p0), (s1, p1) = ck[0], ck[-1]
    held = load_checkpoint(p0)
    x = torch.randint(0, get_backend(held).d_vocab, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = get_backend(held).logits(x)
        reused = load_checkpoint(p1, into=held)
        assert reused is held and reused.tvlens_info.step == s1
        fresh = load_checkpoint(p1)
        assert fresh is not held
        assert torch.equal(get_backend(reused).logits(x), get_backend(fresh).logits(x))
        assert (get_backend(reused).logits(x) - before).abs().max() > 1e-3  # the weights did change
        back = load_checkpoint(p0, into=held)
        assert torch.equal(get_backend(back).logits(x), before)
    assert reused.tokenizer is not None and reused.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()


def test_a_model_of_another_config_is_not_reused():
    other = load_checkpoint(list_checkpoints("bitwise")[-1][1])
    p = list_checkpoints("default")[-1][1]
    got = load_checkpoint(p, into=other)
    assert got is not other
    x = torch.randint(0, get_backend(got).d_vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(get_backend(got).logits(x), get_backend(load_checkpoint(p)).logits(x))
