"""Activation-patching sweeps equal transformer_lens.patching's numbers (within 1e-4)."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tlp

from tvlens.backends import has_hooked_transformer
from tvlens.backends.loading import build
from tvlens.errors import ConfigError

# skip_prefix continues a HookedTransformer's key/value cache here; a TransformerBridge booted from Hugging Face
# continues its attention's (tests/test_prefix_bridge.py); a boot_native bridge cannot: test_skip_prefix_refused_on_a_bridge
from tvlens.sweeps import activation_patching  # noqa: E402

needs_hooked = pytest.mark.skipif(not has_hooked_transformer(), reason="skip_prefix needs a HookedTransformer (TL 3.x)")


@pytest.fixture(scope="module")
def setup():
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=40,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = build(cfg, False)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 40, (3, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 40, (3,), generator=g)
    corrupted[:, 4] = torch.randint(0, 40, (3,), generator=g)
    _, clean_cache = model.run_with_cache(clean)

    def metric(logits):  # per prompt: logit difference of tokens 3 and 5 at the read position(s)
        return (logits[:, -1, 3] - logits[:, -1, 5])

    def tl_metric(logits):
        return metric(logits[:, -1:]).mean()

    return model, clean, corrupted, clean_cache, metric, tl_metric


CASES = [
    ("resid_pre", ("layer", "pos"), tlp.get_act_patch_resid_pre),
    ("resid_mid", ("layer", "pos"), tlp.get_act_patch_resid_mid),
    ("attn_out", ("layer", "pos"), tlp.get_act_patch_attn_out),
    ("mlp_out", ("layer", "pos"), tlp.get_act_patch_mlp_out),
    ("z", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_out_by_pos),
    ("q", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_q_by_pos),
    ("k", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_k_by_pos),
    ("v", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_v_by_pos),
    ("z", ("layer", "head"), tlp.get_act_patch_attn_head_out_all_pos),
    ("q", ("layer", "head"), tlp.get_act_patch_attn_head_q_all_pos),
    ("k", ("layer", "head"), tlp.get_act_patch_attn_head_k_all_pos),
    ("v", ("layer", "head"), tlp.get_act_patch_attn_head_v_all_pos),
    ("pattern", ("layer", "head"), tlp.get_act_patch_attn_head_pattern_all_pos),
    ("pattern", ("layer", "head", "dest"), tlp.get_act_patch_attn_head_pattern_by_pos),
]


@pytest.mark.parametrize("site,by,tl_fn", CASES, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in CASES])
def test_sweep_equals_transformer_lens(setup, site, by, tl_fn):
    model, clean, corrupted, clean_cache, metric, tl_metric = setup
    ref = tl_fn(model, corrupted, clean_cache, tl_metric)
    ours = activation_patching(model, clean, corrupted, metric, site=site, by=by, read_positions=[-1],
                               batch_size=10, progress=False)
    assert ours.values.shape == ref.shape
    assert (ours.values - ref.cpu()).abs().max() <= 1e-4


def test_full_logits_and_per_prompt_read_positions(setup):
    model, clean, corrupted, clean_cache, metric, tl_metric = setup
    ref = tlp.get_act_patch_resid_pre(model, corrupted, clean_cache, tl_metric)
    full = activation_patching(model, clean, corrupted, metric, site="resid_pre", progress=False)
    per_prompt = activation_patching(model, clean, corrupted, metric, site="resid_pre",
                                     read_positions=torch.full((3,), 6), progress=False)
    assert (full.values - ref).abs().max() <= 1e-4 and (per_prompt.values - ref).abs().max() <= 1e-4
    assert full.clean_metric != full.corrupted_metric
    # patching every position of the last layer's input with clean restores the clean metric
    allpos = activation_patching(model, clean, corrupted, metric, site="resid_pre", by=("layer",), progress=False)
    assert allpos.values[0] == pytest.approx(full.clean_metric, abs=1e-4)
    assert len(full.to_dataframe()) == 2 * 7 and full.plot().data


def test_sweep_on_the_shipped_bitwise_model():
    import tvlens

    model = tvlens.load_model("bitwise")
    fam = tvlens.model_info(model).task_family()
    p = fam.sample(2, shots=2, seed=0, tasks=["and", "or"])
    clean, corrupted = p.tokens[:2], p.tokens[2:]
    q = p.query_pos[:2]
    ans = p.answers[:2, 0]

    def metric(logits):  # log-prob of the clean prompts' first answer bit at the query position
        return logits[:, 0].log_softmax(-1)[torch.arange(2), ans]

    def tl_metric(logits):
        return metric(logits[torch.arange(2), q][:, None]).mean()

    _, cache = model.run_with_cache(clean)
    ref = tlp.get_act_patch_resid_pre(model, corrupted, cache, tl_metric)
    ours = activation_patching(model, clean, corrupted, metric, read_positions=q, batch_size=64, progress=False)
    assert (ours.values - ref).abs().max() <= 1e-4
    if has_hooked_transformer():  # the same sweep with the unchanged prefix skipped (per-prompt read positions)
        skip = activation_patching(model, clean, corrupted, metric, read_positions=q, batch_size=64, progress=False,
                                   skip_prefix=True)
        full = activation_patching(model, clean, corrupted, metric, read_positions=q, batch_size=64, progress=False,
                                   skip_prefix=False)
        assert skip.notes["skip_prefix"] and (skip.values - ref).abs().max() <= 1e-4
        assert (skip.values - full.values).abs().max() <= 1e-4


def test_bad_sweep_input(setup):
    model, clean, corrupted, clean_cache, metric, tl_metric = setup
    with pytest.raises(ConfigError, match="same shape"):
        activation_patching(model, clean, corrupted[:, :5], metric, progress=False)
    with pytest.raises(ConfigError, match="unknown site"):
        activation_patching(model, clean, corrupted, metric, site="embed", progress=False)
    with pytest.raises(ConfigError, match="can be swept by"):
        activation_patching(model, clean, corrupted, metric, site="z", by=("layer", "pos"), progress=False)
    with pytest.raises(ConfigError, match="one number per prompt"):
        activation_patching(model, clean, corrupted, lambda lg: lg.mean(), progress=False)
    with pytest.raises(ConfigError, match="out of range"):
        activation_patching(model, clean, corrupted, metric, layers=[2], progress=False)
    with pytest.raises(ConfigError, match="read_positions"):
        activation_patching(model, clean, corrupted, metric, read_positions=[9], progress=False)
    with pytest.raises(ConfigError, match="cannot fit"):
        activation_patching(model, clean, corrupted, metric, batch_size=2, progress=False)


# --- skipping the unchanged prefix (skip_prefix): exact against the full recomputation and TransformerLens ---

PREFIX_CASES = [
    ("resid_pre", ("layer", "pos"), tlp.get_act_patch_resid_pre),
    ("resid_mid", ("layer", "pos"), tlp.get_act_patch_resid_mid),
    ("resid_post", ("layer", "pos"), None),
    ("attn_out", ("layer", "pos"), tlp.get_act_patch_attn_out),
    ("mlp_out", ("layer", "pos"), tlp.get_act_patch_mlp_out),
    ("z", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_out_by_pos),
    ("q", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_q_by_pos),
    ("k", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_k_by_pos),
    ("v", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_v_by_pos),
    ("result", ("layer", "pos", "head"), None),
]


@needs_hooked
@pytest.mark.parametrize("site,by,tl_fn", PREFIX_CASES, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in PREFIX_CASES])
def test_skip_prefix_equals_full_run_and_transformer_lens(setup, site, by, tl_fn, monkeypatch):
    from tvlens.backends._common import CommonBackend

    model, clean, corrupted, clean_cache, metric, tl_metric = setup
    kw = dict(site=site, by=by, read_positions=[-1], batch_size=12, progress=False)  # 4 heads per call
    auto = activation_patching(model, clean, corrupted, metric, **kw)  # neighbouring positions may share a call
    monkeypatch.setattr(CommonBackend, "call_cost_tokens", 0.0)  # every patched position its own call
    skip = activation_patching(model, clean, corrupted, metric, skip_prefix=True, **kw)
    full = activation_patching(model, clean, corrupted, metric, skip_prefix=False, **kw)
    assert skip.notes["skip_prefix"] and not full.notes["skip_prefix"] and auto.notes["skip_prefix"]
    # one call per (layer, patched position) whose patch changes something: positions 0-1 (before the corruptions
    # at 2 and 4) change nothing at either layer, so they are not run (their value is the corrupted metric)
    per_pos = 4 if "head" in by else 1  # the 4 heads of a position share a call
    assert skip.notes["unchanged_patches"] >= 2 * 2 * per_pos
    assert skip.notes["forward_calls"] == 2 * 7 - skip.notes["unchanged_patches"] // per_pos
    # merged where a chunk has room (by position: one patch per position; by head: 4 heads fill a chunk of 12 rows)
    assert auto.notes["forward_calls"] < skip.notes["forward_calls"] if "head" not in by else \
        auto.notes["forward_calls"] == skip.notes["forward_calls"]
    assert (skip.values - full.values).abs().max() <= 1e-4 and (auto.values - full.values).abs().max() <= 1e-4
    assert full.values.abs().max() > 0 and (full.values - full.corrupted_metric).abs().max() > 1e-3
    if tl_fn is not None:
        ref = tl_fn(model, corrupted, clean_cache, tl_metric)
        assert (skip.values - ref).abs().max() <= 1e-4


@needs_hooked
def test_skip_prefix_on_a_rotary_model():
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=40,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                                  rotary_dim=8, seed=3)
    model = build(cfg, False)
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 40, (2, 8), generator=g)
    corrupted = torch.randint(0, 40, (2, 8), generator=g)
    _, cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[:, -1, 1] - logits[:, -1, 2]

    for site, by, tl_fn in [("resid_pre", ("layer", "pos"), tlp.get_act_patch_resid_pre),
                            ("k", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_k_by_pos)]:
        ref = tl_fn(model, corrupted, cache, lambda lg: metric(lg).mean())
        skip = activation_patching(model, clean, corrupted, metric, site=site, by=by, read_positions=[-1],
                                   batch_size=8, progress=False, skip_prefix=True)
        assert skip.notes["skip_prefix"] and (skip.values - ref).abs().max() <= 1e-4


@needs_hooked
def test_skip_prefix_reading_before_the_patched_position(setup):
    # the metric reads position 3: patches at positions > 3 still run from position 3 on, exactly
    model, clean, corrupted, clean_cache, _, _ = setup

    def metric(logits):
        return logits[:, 0, 3] - logits[:, 0, 5]

    ref = tlp.get_act_patch_resid_pre(model, corrupted, clean_cache, lambda lg: metric(lg[:, 3:4]).mean())
    skip = activation_patching(model, clean, corrupted, metric, read_positions=[3], batch_size=10, progress=False,
                               skip_prefix=True)
    assert skip.notes["skip_prefix"] and (skip.values - ref).abs().max() <= 1e-4
    assert skip.values[:, 4:].abs().max() == pytest.approx(abs(skip.corrupted_metric), abs=1e-4)


@needs_hooked
def test_skip_prefix_with_patch_positions_and_source(setup):
    # one position per prompt (what head attribution sweeps), with a mean activation patched in
    model, clean, corrupted, clean_cache, metric, _ = setup
    pos = torch.tensor([3, 5, 4])
    source = {L: clean_cache[f"blocks.{L}.attn.hook_z"].mean(0) for L in range(2)}
    kw = dict(site="z", by=("layer", "head"), read_positions=torch.full((3,), 6), patch_positions=pos,
              source=source, batch_size=12, progress=False, per_prompt=True)
    skip = activation_patching(model, None, corrupted, metric, skip_prefix=True, **kw)
    full = activation_patching(model, None, corrupted, metric, skip_prefix=False, **kw)
    assert skip.notes["skip_prefix"] and (skip.per_prompt - full.per_prompt).abs().max() <= 1e-4
    assert (full.values - full.corrupted_metric).abs().max() > 1e-3


def test_skip_prefix_true_when_it_cannot_be_done(setup):
    model, clean, corrupted, _, metric, _ = setup
    with pytest.raises(ConfigError, match="read_positions is None"):
        activation_patching(model, clean, corrupted, metric, skip_prefix=True, progress=False)
    with pytest.raises(ConfigError, match="pattern"):
        activation_patching(model, clean, corrupted, metric, site="pattern", by=("layer", "head", "dest"),
                            read_positions=[-1], skip_prefix=True, progress=False)


@needs_hooked
@pytest.mark.parametrize("site,by", [("resid_pre", ("layer",)), ("z", ("layer", "head")), ("mlp_out", ("layer",))])
def test_all_position_patches_start_at_their_first_changed_position(setup, site, by):
    """A patch at every position changes nothing before the first position where clean and corrupted differ
    (2 here): the run starts there (skip_prefix), with the full run's numbers."""
    model, clean, corrupted, _, metric, _ = setup
    kw = dict(site=site, by=by, read_positions=[-1], progress=False)
    skip = activation_patching(model, clean, corrupted, metric, skip_prefix=True, **kw)
    full = activation_patching(model, clean, corrupted, metric, skip_prefix=False, **kw)
    assert skip.notes["skip_prefix"] and not full.notes["skip_prefix"]
    torch.testing.assert_close(skip.values, full.values, atol=1e-5, rtol=1e-5)
    assert (full.values - full.corrupted_metric).abs().max() > 1e-3


def test_skip_prefix_refused_on_a_bridge():
    """A boot_native bridge's attention keeps no key/value cache (a bridge booted from Hugging Face does:
    tests/test_prefix_bridge.py), so its self-test fails: skip_prefix=True is a clear error, None runs."""
    from tvlens.backends.loading import build

    model = build(dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=40, act_fn="gelu",
                       normalization_type="LN", seed=0), False, backend="bridge")
    x = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="skip_prefix=True cannot skip"):
        activation_patching(model, x, x.flip(0), lambda lg: lg[:, -1, 0], site="resid_pre", by=("layer", "pos"),
                            read_positions=[-1], progress=False, skip_prefix=True)
    res = activation_patching(model, x, x.flip(0), lambda lg: lg[:, -1, 0], site="resid_pre", by=("layer", "pos"),
                              read_positions=[-1], progress=False)
    assert torch.isfinite(res.values).all()
