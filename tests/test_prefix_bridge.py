"""A TransformerBridge booted from Hugging Face continues a prefix of positions exactly (tvlens.backends.prefix):
sweeps that skip the unpatched prefix give the full run's numbers, and TransformerLens' own, on both
TransformerLens lines, for GPT-2 (learned positions), Llama (rotary, grouped-query attention) and Gemma-2
(soft caps, a sliding window shorter than the prompt)."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tlp
from tiny_bridges import V, tiny_bridge

from tvlens.backends import get_backend
from tvlens.backends._common import CommonBackend
from tvlens.errors import ConfigError
from tvlens.sweeps import activation_patching


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def bridge(request, tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_bridge(request.param, tmp_path_factory.mktemp("tok"))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(4, V, (3, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, V, (3,), generator=g)
    corrupted[:, 5] = torch.randint(4, V, (3,), generator=g)
    return request.param, model, clean, corrupted


def metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


def test_the_bridge_continues_a_prefix_exactly(bridge):
    _, model, clean, _ = bridge
    bk = get_backend(model)
    assert bk.supports_prefix_kv()
    with torch.no_grad():
        logits, rec = bk.record_kv(clean)
        resid = bk.embed_input(clean)
        full = bk.run_from(resid, 0)
        for o in (1, 4, 8):
            part = bk.run_from(resid[:, o:], 0, past_kv=bk.prefix_kv(rec, 0, o, 1))
            assert (part - full[:, o:]).abs().max() <= 1e-5
        two = bk.run_from(resid[:, 4:].repeat(2, 1, 1), 0, past_kv=bk.prefix_kv(rec, 0, 4, 2))  # stacked twice
        assert (two - full[:, 4:].repeat(2, 1, 1)).abs().max() <= 1e-5
        assert (bk.unembed(full) - logits).abs().max() <= 1e-4
    with pytest.raises(ConfigError, match="past_kv"):
        bk.run_from(resid, 0, past_kv=object())


SITES = [("resid_pre", ("layer", "pos")), ("attn_out", ("layer", "pos")), ("mlp_out", ("layer", "pos")),
         ("z", ("layer", "pos", "head")), ("k", ("layer", "pos", "head"))]


@pytest.mark.parametrize("merge", [False, True], ids=["call-per-position", "merged"])
@pytest.mark.parametrize("site,by", SITES, ids=[s for s, _ in SITES])
def test_prefix_sweep_equals_the_full_run(bridge, site, by, merge, monkeypatch):
    arch, model, clean, corrupted = bridge
    if not merge:
        monkeypatch.setattr(CommonBackend, "call_cost_tokens", 0.0)
    kw = dict(site=site, by=by, read_positions=[-1], batch_size=12, progress=False, per_prompt=True)
    skip = activation_patching(model, clean, corrupted, metric, skip_prefix=True, **kw)
    full = activation_patching(model, clean, corrupted, metric, skip_prefix=False, **kw)
    assert skip.notes["skip_prefix"] and not full.notes["skip_prefix"]
    if not merge:
        assert skip.notes["forward_calls"] > full.notes["forward_calls"] or site in ("z", "k")
    moved = float((full.per_prompt - full.corrupted_per_prompt).abs().max())
    assert moved > 1e-6  # the patches move the metric, by far more than the difference allowed
    assert (skip.per_prompt - full.per_prompt).abs().max() <= min(1e-5, 1e-2 * moved)
    tl_fn = {"resid_pre": tlp.get_act_patch_resid_pre, "attn_out": tlp.get_act_patch_attn_out,
             "mlp_out": tlp.get_act_patch_mlp_out}.get(site)
    if tl_fn is not None:
        _, cache = model.run_with_cache(clean)
        ref = tl_fn(model, corrupted, cache, lambda lg: metric(lg).mean())
        assert (skip.values - ref).abs().max() <= 1e-4


def test_prefix_sweep_reading_before_the_patched_position(bridge):
    # reads at position 3: patches at later positions start from position 3; earlier ones from their own
    _, model, clean, corrupted = bridge

    def m3(logits):
        return logits[:, 0, 3] - logits[:, 0, 5]

    kw = dict(read_positions=[3], batch_size=64, progress=False)
    skip = activation_patching(model, clean, corrupted, m3, skip_prefix=True, **kw)
    full = activation_patching(model, clean, corrupted, m3, skip_prefix=False, **kw)
    assert skip.notes["skip_prefix"] and (skip.values - full.values).abs().max() <= 1e-5


def test_plan_merges_positions_only_where_cheaper():
    from tvlens.sweeps import _plan_chunks

    first = [0, 0, 1, 1, 5, 5, 9]
    assert _plan_chunks(first, 9, 8) == [(0, 2, 0), (2, 4, 1), (4, 6, 5), (6, 7, 9)]  # no call cost: one per position
    merged = _plan_chunks(first, 9, 8, B=1, seq=10, call_cost=1e6)  # calls dear: one call
    assert merged == [(0, 7, 0)]
    assert _plan_chunks(first, 9, 2, B=1, seq=10, call_cost=1e6) == [(0, 2, 0), (2, 4, 1), (4, 6, 5), (6, 7, 9)]
    cheap = _plan_chunks(first, 9, 8, B=4, seq=10, call_cost=10)  # rows dear: merges only 0 and 1
    assert cheap[0] == (0, 4, 0) and [c[2] for c in cheap[1:]] == [5, 9]
