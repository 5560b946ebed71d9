"""Edges on the models users have: grouped-query attention (a key/value head is one receiver shared by its
query heads) and the q/k/v fork tvlens gives TransformerLens' native bridge (the shipped models on TL 4.x),
each against exact references that do not use the code under test."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens.backends import get_backend, has_hooked_transformer
from tvlens.circuits import Graph, edge_attribution, faithfulness, graph_of, path_patching
from tvlens.errors import ConfigError


def _promptset(vocab, n=4, seq=8, seed=0, corrupt_at=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, vocab, (n, seq), generator=g)
    corr = clean.clone()
    for p in corrupt_at:
        corr[:, p] = torch.randint(4, vocab, (n,), generator=g)
    answers = torch.randint(4, vocab, (n, 1), generator=g)

    def ps(tokens):
        return tvlens.PromptSet(family="random", params={}, task_names=["random"], labels=torch.zeros(n, dtype=torch.long),
                                query_pos=torch.full((n,), seq - 1), answers=answers, targets=tokens,
                                train_mask=torch.zeros(n, seq, dtype=torch.bool), shots=0, tokens=tokens)
    return ps(clean), ps(corr)


def _tiny(n_kv=None, attn_only=True, normalization=None, n_layers=1, seed=0):
    """A tvlens-built model (HookedTransformer on TL 3.x, boot_native bridge on 4.x), weights scaled up so the
    attention is far from uniform."""
    from tvlens.backends.loading import build

    cfg = dict(n_layers=n_layers, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=20, attn_only=attn_only,
               normalization_type=normalization, act_fn="gelu", d_mlp=None if attn_only else 64, seed=seed)
    if n_kv is not None:
        cfg["n_key_value_heads"] = n_kv
    model = build(cfg, False).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random-weight Llama with grouped-query attention (4 query heads, 2 key/value heads), written as a
    Hugging Face folder and loaded the way a user loads SmolLM2: HookedTransformer on TL 3.9, bridge on 4.x."""
    import tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gqa_llama")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=32, initializer_range=0.3,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(40)}, unk_token="w0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", bos_token="w1", eos_token="w2",
                            pad_token="w3").save_pretrained(folder)
    model = tvlens.load_model(folder)
    bk = get_backend(model)
    assert (bk.n_heads, bk.n_key_value_heads) == (4, 2)
    return model


def test_gqa_graph_has_one_key_and_one_value_receiver_per_key_value_head(llama):
    g = graph_of(llama)
    assert g.grouped and g.n_kv_heads == 2
    r1 = [r for r in g.receivers if r.startswith("L1")]
    assert [r for r in r1 if r.endswith(".q")] == [f"L1H{h}.q" for h in range(4)]
    assert [r for r in r1 if r.endswith(".k")] == ["L1KV0.k", "L1KV1.k"]
    assert [r for r in r1 if r.endswith(".v")] == ["L1KV0.v", "L1KV1.v"]
    assert g.query_heads("L1KV1.k") == [2, 3] and g.query_heads("L1H3.q") == [3]
    assert Graph.receiver_layer("L1KV1.v") == ("v", 1, 1)
    with pytest.raises(ConfigError, match="key/value heads"):
        g.check_edge("L0H0", "L1H3.k")  # a query head has no key input of its own under GQA
    # into layer 1's 4 q + 2 k + 2 v receivers: embed, 4 layer-0 heads, MLP0; into MLP1: those and layer 1's heads
    n_into_l1 = 6 * (4 + 2 + 2) + 10
    assert sum(1 for _, r in g.edges if r.startswith(("L1", "MLP1"))) == n_into_l1
    assert Graph(2, 4, True).receivers == Graph(2, 4, True, 4).receivers  # as many kv heads as heads: no change


def _outputs(bk, tokens):
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(bk.n_layers)] + [
        f"blocks.{l}.hook_mlp_out" for l in range(bk.n_layers)]
    with torch.no_grad():
        cache = bk.capture(tokens, names)

    def out(s):
        if s == "embed":
            return cache["blocks.0.hook_resid_pre"]
        if s.startswith("MLP"):
            return cache[f"blocks.{s[3:]}.hook_mlp_out"]
        layer, h = map(int, s[1:].split("H"))
        return cache[f"blocks.{layer}.attn.hook_z"][:, :, h] @ bk.W_O[layer, h]
    return out


def _naive(model, p, c, s, r, eps):
    """Metric (answer log-prob) of the corrupted run with ``eps * (clean - corrupted sender)`` added to receiver
    ``r`` alone, by plain hooks (``eps`` [n, 1, 1]); under GQA a k/v receiver is the key/value head's input."""
    bk = get_backend(model)
    d = _outputs(bk, p.tokens)(s) - _outputs(bk, c.tokens)(s)
    kind, layer, h = Graph.receiver_layer(r)

    def add(act, hook):
        return act + eps * d

    def add_head(act, hook):
        act = act.clone()
        act[:, :, h] = act[:, :, h] + eps * d
        return act
    if kind == "logits":
        hooks = [(f"blocks.{bk.n_layers - 1}.hook_resid_post", add)]
    elif kind == "mlp":
        hooks = [(f"blocks.{layer}.hook_mlp_in", add)]
    else:
        hooks = [(f"blocks.{layer}.hook_{kind}_input", add_head)]
    rows = torch.arange(len(p))
    logits = bk.run_with_hooks(c.tokens, fwd_hooks=hooks)[rows, p.query_pos]
    return logits.log_softmax(-1)[rows, p.answers[:, 0]]


EDGES = [("L0H3", "L1KV1.k"), ("embed", "L1KV0.v"), ("L0H1", "L1H2.q"), ("MLP0", "L1KV1.v"), ("L0H2", "L1KV0.k"),
         ("MLP1", "logits"), ("L1H0", "MLP1")]


def test_gqa_path_patching_equals_a_naive_hook_loop(llama):
    p, c = _promptset(40)
    pp = path_patching(llama, p, edges=EDGES, corrupted=c, progress=False)
    bk = get_backend(llama)
    one = torch.ones(len(p), 1, 1)
    with torch.no_grad():
        bk.set_use_split_qkv_input(True)
        bk.set_use_hook_mlp_in(True)
        try:
            base = _naive(llama, p, c, "embed", "logits", 0 * one)
            for (s, r), got in zip(EDGES, pp.per_prompt.T):
                ref = _naive(llama, p, c, s, r, one) - base
                assert torch.allclose(got, ref, atol=1e-4), (s, r, got, ref)
        finally:
            bk.set_use_split_qkv_input(False)
            bk.set_use_hook_mlp_in(False)
    assert pp.per_prompt.abs().max() > 1e-3  # the patches do something
    assert pp.n_key_value_heads == 2 and pp.graph.grouped


def test_gqa_eap_is_the_derivative_of_path_patching(llama):
    """EAP of an edge = d metric / d eps of the corrupted run with eps * (clean - corrupted sender) added to the
    receiver: for a key/value receiver, the gradient at the key/value head's input, through every query head
    of its group (autograd through plain hooks, per prompt)."""
    p, c = _promptset(40)
    eap = edge_attribution(llama, p, method="eap", corrupted=c, qk_fix=False, progress=False)
    bk = get_backend(llama)
    bk.set_use_split_qkv_input(True)
    bk.set_use_hook_mlp_in(True)
    try:
        for s, r in EDGES:
            eps = torch.zeros(len(p), 1, 1, requires_grad=True)
            with torch.enable_grad():
                m = _naive(llama, p, c, s, r, eps)
                (grad,) = torch.autograd.grad(m.sum(), eps)
            got = eap.per_prompt[:, eap.edges.index((s, r))]
            assert torch.allclose(got, grad.flatten(), rtol=1e-3, atol=1e-5), (s, r, got, grad.flatten())
    finally:
        bk.set_use_split_qkv_input(False)
        bk.set_use_hook_mlp_in(False)
    # the residual stream is a sum: a sender's edges add up to its node estimate only if every k/v receiver counts
    node = tvlens.head_attribution(llama, p, method="eap-ig", ig_steps=1, corrupted=c, progress=False, per_task=False)
    summed = torch.zeros(2, 4)
    for (s, _), v in zip(eap.edges, eap.scores):
        if s.startswith("L"):
            layer, h = map(int, s[1:].split("H"))
            summed[layer, h] += v
    assert torch.allclose(summed, node.scores, atol=1e-4 * (1 + float(node.scores.abs().max())))


@pytest.mark.parametrize("n_kv", [None, 2])
def test_eap_is_exact_where_the_model_is_linear_in_the_receiver(n_kv):
    """1 layer, attention only, no norm, logit metric (as test_circuits' check), with and without grouped-query
    attention: EAP equals exact path patching on edges into v and the logits, and AtP*'s QK fix makes q and k
    edges exact too; under GQA a key edge moves the patterns of both query heads of its group."""
    model = _tiny(n_kv=n_kv)
    p, c = _promptset(20, corrupt_at=(2, 5, 7))
    pp = path_patching(model, p, corrupted=c, metric="logit", progress=False)
    eap = edge_attribution(model, p, method="eap", corrupted=c, metric="logit", progress=False)
    fixed = edge_attribution(model, p, method="eap", qk_fix=True, corrupted=c, metric="logit", progress=False)
    n_k = 2 if n_kv else 4
    assert sum(k == "k" for k in pp.receiver_kinds()) == n_k  # embed -> each key receiver
    lin = torch.tensor([k in ("v", "logits") for k in eap.receiver_kinds()])
    tol = 1e-4 * float(pp.per_prompt.abs().max())
    assert torch.allclose(eap.per_prompt[:, lin], pp.per_prompt[:, lin], rtol=1e-4, atol=tol)
    assert (eap.scores[~lin] - pp.scores[~lin]).abs().max() > 1e-4
    assert torch.allclose(fixed.per_prompt, pp.per_prompt, rtol=1e-4, atol=tol)
    assert pp.scores.abs().max() > 1e-2


def test_gqa_faithfulness_endpoints_and_edge_scores_roundtrip(llama, tmp_path):
    p, c = _promptset(40, n=6)
    ig = edge_attribution(llama, p, corrupted=c, ig_steps=2, progress=False)
    f = faithfulness(llama, p, ig, corrupted=c, ks=[0, 16, len(ig)], n_random=2)
    assert abs(f.notes["full_graph_recovered"] - 1) < 1e-3 and abs(f.notes["empty_graph_recovered"]) < 1e-3
    assert abs(float(f.recovered[-1]) - 1) < 1e-3 and abs(float(f.recovered[0])) < 1e-3
    ig.save(tmp_path / "edges")
    back = type(ig).load(tmp_path / "edges")
    assert back.graph == ig.graph and back.edges == ig.edges
    html = ig.plot(k=5).html  # the graph view draws a key/value receiver at its group's first query head
    assert "L1KV" in html


def test_faithfulness_refuses_a_gap_too_small_to_divide_by():
    model = _tiny(n_layers=1)
    p, _ = _promptset(20)
    e = edge_attribution(model, p, method="eap", corrupted=p, metric="logit", qk_fix=False, progress=False)
    with pytest.raises(ConfigError, match="gap .* undefined"):
        faithfulness(model, p, e, corrupted=p, metric="logit", ks=[1])
    # a real gap: its bootstrap interval is kept, and a warning says when that interval holds 0
    p2, c2 = _promptset(20, corrupt_at=(6,), n=8, seed=3)
    e2 = edge_attribution(model, p2, method="eap", corrupted=c2, metric="logit", qk_fix=False, progress=False)
    f = faithfulness(model, p2, e2, corrupted=c2, metric="logit", ks=[1, len(e2)], n_random=0)
    lo, hi = f.notes["gap_ci"]
    assert lo <= f.notes["gap"] <= hi
    assert ("gap_warning" in f.notes) == (lo <= 0 <= hi)
    assert ("WARNING" in repr(f)) == (lo <= 0 <= hi)


def test_native_fork_routes_each_heads_inputs_alone():
    """On the model tvlens builds (a boot_native bridge on TL 4.x, whose attention TransformerLens gives no
    q/k/v fork), replacing one query head's q input and its key/value head's k and v inputs by the clean
    residual (before the norm) gives that head the clean run's z exactly and leaves every other group alone;
    with the fork off again the logits are bit-identical to before."""
    model = _tiny(n_kv=2, attn_only=False, normalization="LN", n_layers=2)
    bk = get_backend(model)
    p, c = _promptset(20)
    with torch.no_grad():
        before = bk.logits(c.tokens)
        clean = bk.capture(p.tokens, ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"])
        corr_z = bk.capture(c.tokens, ["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"]
        h, g = 3, 1  # query head 3 reads key/value head 1 (heads 2 and 3 share it)

        def put(i):
            def hook(act, hook):
                act = act.clone()
                act[:, :, i] = clean["blocks.1.hook_resid_pre"]
                return act
            return hook
        old = bk.set_use_split_qkv_input(True)
        try:
            store = {}

            def keep(act, hook):
                store["z"] = act
            with bk.hooks(fwd_hooks=[("blocks.1.hook_q_input", put(h)), ("blocks.1.hook_k_input", put(g)),
                                     ("blocks.1.hook_v_input", put(g)), ("blocks.1.attn.hook_z", keep)]):
                bk.logits(c.tokens)
            z = store["z"]
        finally:
            bk.set_use_split_qkv_input(old)
        after = bk.logits(c.tokens)
    err = (z[:, :, h] - clean["blocks.1.attn.hook_z"][:, :, h]).abs().max()
    assert err <= 1e-4 * (1 + clean["blocks.1.attn.hook_z"].abs().max()), err
    assert not torch.allclose(z[:, :, 2], clean["blocks.1.attn.hook_z"][:, :, 2], atol=1e-3)  # q not replaced
    assert (z[:, :, :2] - corr_z[:, :, :2]).abs().max() <= 1e-4 * (1 + corr_z.abs().max())  # other group: untouched
    assert torch.equal(before, after)


@pytest.mark.skipif(not has_hooked_transformer(), reason="compares with HookedTransformer, which TL 4 removed")
def test_native_bridge_edges_equal_the_hooked_transformer_with_the_same_weights():
    from tvlens.backends.loading import build, tl_state

    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=20, attn_only=False,
               normalization_type="LN", act_fn="gelu", d_mlp=64, seed=0)
    bridge = build(cfg, False, backend="bridge").eval()
    with torch.no_grad():
        for prm in bridge.parameters():
            prm.mul_(3.0)
    hooked = build(cfg, False, backend="hooked").eval()
    hooked.load_state_dict(tl_state(bridge))
    p, c = _promptset(20)
    a = edge_attribution(bridge, p, method="eap", corrupted=c, progress=False)
    b = edge_attribution(hooked, p, method="eap", corrupted=c, progress=False)
    assert a.edges == b.edges
    err = (a.per_prompt - b.per_prompt).abs().max()
    assert err <= 1e-4 * (1 + b.per_prompt.abs().max()), err
    pa = path_patching(bridge, p, edges=a.top(10), corrupted=c, progress=False)
    pb = path_patching(hooked, p, edges=a.top(10), corrupted=c, progress=False)
    err = (pa.per_prompt - pb.per_prompt).abs().max()
    assert err <= 1e-4 * (1 + pb.per_prompt.abs().max()) and pa.per_prompt.abs().max() > 1e-3, err


def test_a_subset_of_layers_scores_the_same_edges_as_the_full_graph(llama):
    """``layers=``: the sub-graph of edges whose ends are the embedding, the logits or components of those layers,
    each scored as in the full graph (the QK fix runs only for the receiving layers kept)."""
    p, c = _promptset(40)
    full = edge_attribution(llama, p, corrupted=c, ig_steps=2, progress=False)
    sub = edge_attribution(llama, p, corrupted=c, ig_steps=2, layers=[1], progress=False)
    assert sub.edges and set(sub.edges) < set(full.edges)
    assert all(not s.startswith(("L0", "MLP0")) for s, _ in sub.edges)
    assert ("embed", "L1KV0.k") in sub.edges and ("L1H2", "logits") in sub.edges
    assert ("embed", "L0H0.q") not in sub.edges and ("L0H1", "L1H2.q") not in sub.edges
    idx = [full.edges.index(e) for e in sub.edges]
    assert torch.allclose(sub.per_prompt, full.per_prompt[:, idx], atol=1e-5)
    pp = edge_attribution(llama, p, corrupted=c, method="path-patch", layers=[1], progress=False)
    assert pp.edges == sub.edges
    with pytest.raises(ConfigError, match="layers"):
        edge_attribution(llama, p, corrupted=c, layers=[2], progress=False)
    with pytest.raises(ConfigError, match="full edge graph"):
        faithfulness(llama, p, sub, corrupted=c, ks=[1])


def test_gqa_head_scores_by_every_method(llama):
    """Heads on a grouped-query model: the exact sweep and every estimate give a finite [layer, head] map; EAP-IG
    with one step is AtP at the heads' outputs. AtP at q/k/v has no per-query-head key or value to split a head's
    effect into, and says so."""
    p, c = _promptset(40)
    maps = {}
    for name, kw in {"patch": dict(method="patch"), "eap": dict(method="eap-ig", ig_steps=1),
                     "atp-z": dict(method="atp", atp_site="z"), "graddrop": dict(method="atp", grad_drop=True)}.items():
        hs = tvlens.head_attribution(llama, p, corrupted=c, per_task=False, progress=False, **kw)
        assert hs.scores.shape == (2, 4) and bool(torch.isfinite(hs.scores).all()), name
        maps[name] = hs.scores
    assert maps["patch"].abs().max() > 1e-3
    assert torch.allclose(maps["eap"], maps["atp-z"], atol=1e-4 * (1 + float(maps["atp-z"].abs().max())))
    with pytest.raises(ConfigError, match="atp_site='qkv'.*atp_site='z'"):
        tvlens.head_attribution(llama, p, corrupted=c, method="atp", atp_site="qkv", progress=False)
