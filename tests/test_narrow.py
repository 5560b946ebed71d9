"""The last block's MLP computed at the read positions only (tvlens.backends.narrow, ``last_block_reads``):
the read positions keep the full run's numbers (and TransformerLens' own in a sweep), every other position
of the last block's output is NaN (never a silent number), and it is a no-op wherever it would not be exact
(a hook inside the MLP, training mode, no positions). GPT-2, Llama (grouped-query) and Gemma-2 bridges on both
TransformerLens lines, and a HookedTransformer on TL 3.x."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformer_lens.patching as tlp
from tiny_bridges import V, tiny_bridge

import tvlens
from tvlens.backends import get_backend, has_hooked_transformer
from tvlens.prompts import PromptSet
from tvlens.sweeps import activation_patching


def _hooked():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, d_vocab=V,
                                  act_fn="gelu_new", normalization_type="LN", seed=0)
    return HookedTransformer(cfg).eval()


KINDS = ["gpt2", "llama", "gemma2"] + (["hooked"] if has_hooked_transformer() else [])


@pytest.fixture(scope="module", params=KINDS)
def model(request, tmp_path_factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if request.param == "hooked":
            return _hooked()
        return tiny_bridge(request.param, tmp_path_factory.mktemp("tok"), n_layers=3)


def _tokens(seed, shape=(3, 9)):
    return torch.randint(4, V, shape, generator=torch.Generator().manual_seed(seed))


def metric(lg):  # per prompt: the logit difference of tokens 5 and 6 at the last read position
    return lg[:, -1, 5] - lg[:, -1, 6]


def _final(bk, x, positions):
    with torch.no_grad(), bk.last_block_reads(positions) as narrowed:
        return bk.run_with_hooks(x, stop_at_layer=bk.n_layers), narrowed


@pytest.mark.parametrize("positions", [[-1], [2, 7], "per_row", "per_row_n", "stacked"])
def test_read_positions_match_the_full_run_and_the_rest_is_nan(model, positions):
    bk = get_backend(model)
    x = _tokens(1)
    full, was = _final(bk, x, None)
    assert not was and not full.isnan().any()
    rows = torch.arange(3)
    if positions == "per_row":
        pos = torch.tensor([8, 3, 5])
        want = full[rows, pos][:, None]
    elif positions == "per_row_n":
        pos = torch.tensor([[8, 0], [3, 4], [5, 5]])
        want = full[rows[:, None], pos]
    elif positions == "stacked":  # 3 prompts' positions applied to each of 2 stacked copies (a sweep's rows)
        x, pos = torch.cat([x, x]), torch.tensor([8, 3, 5])
        full = torch.cat([full, full])
        want = full[torch.arange(6), pos.repeat(2)][:, None]
    else:
        pos = positions
        want = full[:, [p % 9 for p in positions]]
    got, was = _final(bk, x, pos)
    assert was
    if torch.is_tensor(pos):
        r = torch.arange(x.shape[0])[:, None]
        p = (pos[:, None] if pos.ndim == 1 else pos).repeat(x.shape[0] // pos.shape[0], 1)
        read = got[r, p]
    else:
        read = got[:, [q % 9 for q in pos]]
    torch.testing.assert_close(read, want, atol=1e-5, rtol=1e-5)
    mask = torch.ones(got.shape[:2], dtype=torch.bool)
    if torch.is_tensor(pos):
        mask[r, p] = False
    else:
        mask[:, [q % 9 for q in pos]] = False
    assert got[mask].isnan().all(), "positions that were not asked for must be NaN, never a number"


def test_no_op_with_a_hook_inside_the_mlp_or_in_training(model):
    bk = get_backend(model)
    mlp = bk.model.blocks[bk.n_layers - 1].mlp
    x = _tokens(2)
    seen = {}

    def look(mod, args, out):
        seen["shape"] = tuple(out.shape)
    handle = mlp.register_forward_hook(look)
    try:
        out, was = _final(bk, x, [-1])
    finally:
        handle.remove()
    assert not was and not out.isnan().any() and seen["shape"][:2] == (3, 9)
    model.train()
    try:
        out, was = _final(bk, x, [-1])
    finally:
        model.eval()
    assert not was and not out.isnan().any()


@pytest.mark.parametrize("site,by", [("resid_pre", ("layer", "pos")), ("mlp_out", ("layer", "pos")),
                                     ("z", ("layer", "head")), ("attn_out", ("layer",))])
def test_sweeps_narrow_the_last_block_and_match_transformer_lens(model, site, by):
    clean, corrupted = _tokens(3), _tokens(3)
    corrupted[:, 4] = _tokens(4, (3, 1))[:, 0]

    res = activation_patching(model, clean, corrupted, metric, site=site, by=by, read_positions=[-1], progress=False)
    assert res.notes["last_block_read_only_calls"] > 0
    assert not res.values.isnan().any()
    fn = {("resid_pre", ("layer", "pos")): tlp.get_act_patch_resid_pre,
          ("mlp_out", ("layer", "pos")): tlp.get_act_patch_mlp_out,
          ("z", ("layer", "head")): tlp.get_act_patch_attn_head_out_all_pos,
          ("attn_out", ("layer",)): None}[(site, by)]
    with torch.no_grad():
        if fn is None:  # TransformerLens has no by-layer sweep: tvlens' own full-position run, narrowing off
            ref = activation_patching(model, clean, corrupted, metric, site=site, by=by, read_positions=None,
                                      progress=False).values
        else:
            _, cache = model.run_with_cache(clean)
            ref = fn(model, corrupted, cache, lambda lg: metric(lg).mean())
    torch.testing.assert_close(res.values, ref.float(), atol=2e-5, rtol=1e-4)
    assert (res.values - res.values.mean()).abs().max() > 1e-4, "a sweep whose values are all equal tests nothing"


def test_extract_reads_the_final_layer_at_each_query_only(model):
    bk = get_backend(model)
    toks = _tokens(5, (4, 9))
    q = torch.tensor([8, 5, 6, 3])
    P = PromptSet(family="t", params={}, task_names=["a", "b"], tokens=toks, query_pos=q,
                  answers=torch.zeros(4, 1, dtype=torch.long), labels=torch.tensor([0, 1, 0, 1]),
                  targets=toks.clone(), train_mask=torch.zeros_like(toks, dtype=torch.bool), shots=0)
    enc = tvlens.extract(model, P, progress=False)
    with torch.no_grad():
        final = bk.run_with_hooks(toks, stop_at_layer=bk.n_layers)
        first = bk.run_with_hooks(toks, stop_at_layer=1)
    torch.testing.assert_close(enc.at(bk.n_layers), final[torch.arange(4), q], atol=1e-5, rtol=1e-5)
    # a layer below the last is untouched by the narrowing (a different hook, a different block)
    torch.testing.assert_close(enc.at(1), first[torch.arange(4), q], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- one attention for k copies (z sweeps)
def test_shared_attention_is_supported_and_exact(model):
    """A per-head sweep at z computes the patched block's attention once for its stacked copies
    (tvlens.backends.shared): the same numbers as with it off, and as TransformerLens'."""
    bk = get_backend(model)
    assert bk.supports_shared_attention()
    clean, corrupted = _tokens(6), _tokens(7)

    on = activation_patching(model, clean, corrupted, metric, site="z", by=("layer", "head"), read_positions=[-1],
                             progress=False)
    assert on.notes["shared_attention_calls"] == bk.n_layers  # one call per layer, every one shared
    bk._shared_ok = False
    try:
        off = activation_patching(model, clean, corrupted, metric, site="z", by=("layer", "head"), read_positions=[-1],
                                  progress=False)
    finally:
        del bk._shared_ok
    assert off.notes["shared_attention_calls"] == 0
    torch.testing.assert_close(on.values, off.values, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        ref = tlp.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, lambda lg: metric(lg).mean())
    torch.testing.assert_close(on.values, ref.float(), atol=2e-5, rtol=1e-4)


def test_shared_attention_self_test_refuses_an_attention_that_ignores_the_expanded_z(model):
    """If the expanded z never reaches the output (here: a hook that drops the copies again), the self-test
    says no and sweeps compute every copy's attention."""
    from tvlens.backends import shared

    bk = get_backend(model)
    attn = bk.model.blocks[0].attn

    def undo(mod, args, kwargs, out):  # given one row, the attention returns one row (as if z's batch were ignored)
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[0] != 1:
            return out
        return (out[0][:1],) + tuple(out[1:]) if isinstance(out, tuple) else out[:1]
    h = attn.register_forward_hook(undo, with_kwargs=True)
    try:
        assert shared.self_test(bk) is False
    finally:
        h.remove()
    assert shared.self_test(bk) is True


# --------------------------------------------------------------------------- the layers of a chunk in one run
@pytest.mark.parametrize("layers", [[1, 0], [2, 0], [1, 1, 0], [0, 1, 2]])
def test_merged_layers_match_one_run_per_layer(model, layers):
    """A sweep runs the patches of all its layers at one chunk of positions in a single run (rows join at their
    own block), in any order of ``layers`` (repeats included): the values equal TransformerLens', layer by layer."""
    clean = _tokens(8)
    corrupted = 4 + (clean - 4 + 1) % (V - 4)  # every position differs: every layer has the same patches to run

    res = activation_patching(model, clean, corrupted, metric, site="resid_pre", layers=layers, read_positions=[-1],
                              progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        ref = tlp.get_act_patch_resid_pre(model, corrupted, cache, lambda lg: metric(lg).mean())
    torch.testing.assert_close(res.values, ref[layers].float(), atol=2e-5, rtol=1e-4)
    if layers == [1, 0]:  # two layers below the last: one run per chunk of positions, as for one layer
        one = activation_patching(model, clean, corrupted, metric, site="resid_pre", layers=[0], read_positions=[-1],
                                  progress=False)
        assert res.notes["forward_calls"] == one.notes["forward_calls"], "the layers' patches were not run together"


# --------------------------------------------------------------------------- patches that change nothing are not run
def test_patches_that_change_nothing_take_the_corrupted_metric_without_a_run(model):
    """Clean and corrupted differ at position 4 only: a residual patch before it (any layer), or away from it at
    layer 0 (the embeddings), writes what the corrupted run already holds. Those patches are not run; their value
    is the corrupted metric, as TransformerLens computes it by running them."""
    bk = get_backend(model)
    clean = _tokens(10)
    corrupted = clean.clone()
    corrupted[:, 4] = (clean[:, 4] + 7) % (V - 4) + 4

    res = activation_patching(model, clean, corrupted, metric, site="resid_pre", read_positions=[-1], per_prompt=True,
                              progress=False)
    n_layers, seq = bk.n_layers, clean.shape[1]
    # layer 0: all but 4; later: 0..3 (Gemma-2's sliding window of 4 also leaves position 8 at layer 1 untouched)
    want = (seq - 1) + (n_layers - 1) * 4 + (1 if type(bk.model).__name__ != "HookedTransformer"
                                              and "gemma" in str(bk.model.cfg.model_name).lower() else 0)
    assert res.notes["unchanged_patches"] == want
    assert torch.equal(res.values[:, :4], torch.full((n_layers, 4), res.corrupted_metric))
    assert torch.equal(res.per_prompt[1, 2], res.corrupted_per_prompt)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        ref = tlp.get_act_patch_resid_pre(model, corrupted, cache, lambda lg: metric(lg).mean())
    torch.testing.assert_close(res.values, ref.float(), atol=2e-5, rtol=1e-4)
    assert (res.values[:, 4:] - res.corrupted_metric).abs().max() > 1e-4


def test_identical_inputs_need_no_patched_run(model):
    clean = _tokens(11)

    res = activation_patching(model, clean, clean.clone(), metric, site="z", by=("layer", "head"), read_positions=[-1],
                              progress=False)
    assert res.notes["forward_calls"] == 0 and res.notes["unchanged_patches"] == res.values.numel()
    assert torch.equal(res.values, torch.full_like(res.values, res.corrupted_metric))
    assert res.clean_metric == res.corrupted_metric


def test_z_sweep_starts_at_the_first_corrupted_position_with_shared_attention(model):
    """Clean and corrupted differ from position 4 on only: a per-head patch at every position starts its run there
    (the earlier positions' keys and values from the corrupted run), the attention still shared by the copies on a
    bridge; the numbers equal the full run's and TransformerLens'."""
    bk = get_backend(model)
    clean = _tokens(12)
    corrupted = clean.clone()
    corrupted[:, 4] = (clean[:, 4] + 5) % (V - 4) + 4

    kw = dict(site="z", by=("layer", "head"), read_positions=[-1], progress=False)
    auto = activation_patching(model, clean, corrupted, metric, **kw)
    full = activation_patching(model, clean, corrupted, metric, skip_prefix=False, **kw)
    assert auto.notes["skip_prefix"] and not full.notes["skip_prefix"]
    if bk.kind == "bridge":
        assert auto.notes["shared_attention_calls"] == bk.n_layers
    torch.testing.assert_close(auto.values, full.values, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        ref = tlp.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, lambda lg: metric(lg).mean())
    torch.testing.assert_close(auto.values, ref.float(), atol=2e-5, rtol=1e-4)
    assert (full.values - full.corrupted_metric).abs().max() > 1e-4


# --------------------------------------------------------------------------- read positions at the boundary
def test_a_tensor_of_shared_read_positions_reads_the_same_as_the_list(model):
    """A 1-D tensor whose length is not the batch is shared positions, as the checks read it (it was once tiled
    over the prompts: a silent wrong number for 4 prompts and 2 positions)."""
    clean = _tokens(13, (4, 9))
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 3) % (V - 4) + 4

    def mean_metric(lg):
        return (lg[:, :, 5] - lg[:, :, 6]).mean(1)
    kw = dict(site="resid_pre", progress=False)
    as_list = activation_patching(model, clean, corrupted, mean_metric, read_positions=[5, 6], **kw)
    as_tensor = activation_patching(model, clean, corrupted, mean_metric, read_positions=torch.tensor([5, 6]), **kw)
    torch.testing.assert_close(as_tensor.values, as_list.values, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [torch.tensor(3), torch.tensor([1.5, 2.0]), torch.tensor([True, False, True]), [],
                                 torch.zeros(3, 1, 1, dtype=torch.long)])
def test_bad_read_positions_are_refused_before_any_work(model, bad):
    from tvlens.errors import ConfigError

    clean = _tokens(14)
    with pytest.raises(ConfigError, match="read_positions"):
        activation_patching(model, clean, clean.clone(), metric, read_positions=bad, progress=False)


def test_fused_gelu_is_used_inside_a_call_and_the_model_is_restored(model):
    from tvlens.backends.kernels import fused_gelu

    bk = get_backend(model)
    before = [(n, type(m).__name__, getattr(m, "act_fn", None)) for n, m in bk.model.named_modules()]
    with fused_gelu(bk.model) as n:
        gelu_new = bk.kind == "hooked" or "gpt2" in str(bk.model.cfg.model_name).lower()
        assert n == (bk.n_layers if gelu_new else 0)  # GPT-2's and the hooked gelu_new MLPs: one per block
    assert [(n, type(m).__name__, getattr(m, "act_fn", None)) for n, m in bk.model.named_modules()] == before
