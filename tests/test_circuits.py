"""Circuits: EAP / EAP-IG nodes and edges, exact path patching, faithfulness, against independent references."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens.attribution import head_attribution, shuffle_labels
from tvlens.backends import get_backend
from tvlens.circuits import EdgeScores, Graph, edge_attribution, faithfulness, graph_of, path_patching
from tvlens.errors import ConfigError


@pytest.fixture(scope="module")
def codes():
    model = tvlens.load_model("default")
    fam = tvlens.model_info(model).task_family()
    return model, fam.sample(1, shots=4, seed=0)  # 6 prompts, one per task


def _random_promptset(model, n=4, seq=8, seed=0, corrupt_at=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    clean = torch.randint(0, V, (n, seq), generator=g)
    corr = clean.clone()
    for p in corrupt_at:
        corr[:, p] = torch.randint(0, V, (n,), generator=g)
    answers = torch.randint(0, V, (n, 1), generator=g)

    def ps(tokens):
        return tvlens.PromptSet(family="random", params={}, task_names=["random"], labels=torch.zeros(n, dtype=torch.long),
                                query_pos=torch.full((n,), seq - 1), answers=answers, targets=tokens,
                                train_mask=torch.zeros(n, seq, dtype=torch.bool), shots=0, tokens=tokens)
    return ps(clean), ps(corr)


def _tiny(attn_only=True, n_layers=1, normalization=None, seed=0):
    from tvlens.backends.loading import build  # a HookedTransformer on TL 3.x, a boot_native bridge on 4.x

    cfg = dict(n_layers=n_layers, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=20, attn_only=attn_only,
               normalization_type=normalization, act_fn="gelu", d_mlp=None if attn_only else 64, seed=seed)
    model = build(cfg, False).eval()
    with torch.no_grad():  # larger weights than the default init: attention far from uniform, visible effects
        for prm in model.parameters():
            prm.mul_(4.0)
    return model


def test_eap_equals_exact_path_patching_where_the_model_is_linear_in_the_receiver():
    """1 layer, attention only, no LayerNorm, logit metric: the logits are linear in each head's value input and
    in the final residual, so EAP (first order) is exact on edges into v and logits; a q or k edge goes through
    the softmax, where it is not (and must not be reported equal)."""
    torch.manual_seed(0)
    model = _tiny()
    p, c = _random_promptset(model, corrupt_at=(2, 5, 7))
    eap = edge_attribution(model, p, method="eap", corrupted=c, metric="logit", progress=False)
    pp = path_patching(model, p, corrupted=c, metric="logit", progress=False)
    assert eap.edges == pp.edges == graph_of(model).edges
    kinds = eap.receiver_kinds()
    lin = torch.tensor([k in ("v", "logits") for k in kinds])
    assert int(lin.sum()) == 4 + 5  # embed -> each head's v; embed and the 4 heads -> logits
    assert (eap.scores[lin] - pp.scores[lin]).abs().max() <= 1e-4 * (1 + pp.scores[lin].abs().max())
    assert pp.scores[lin].abs().max() > 1e-2  # the patches do something
    qk = ~lin
    assert (eap.scores[qk] - pp.scores[qk]).abs().max() > 1e-4  # softmax: first order is not exact
    # every prompt, not only the mean
    assert torch.allclose(eap.per_prompt[:, lin], pp.per_prompt[:, lin], rtol=1e-4, atol=1e-4 * float(pp.per_prompt.abs().max()))
    # AtP*'s QK fix recomputes the receiving head's softmax exactly and linearises only after it: with no MLP
    # and no LayerNorm after the pattern, that is exact for q and k edges too
    fixed = edge_attribution(model, p, method="eap", qk_fix=True, corrupted=c, metric="logit", progress=False)
    assert torch.allclose(fixed.per_prompt, pp.per_prompt, rtol=1e-4, atol=1e-4 * float(pp.per_prompt.abs().max()))


def test_edge_graph_and_upstream_rule():
    g = Graph(n_layers=2, n_heads=2, mlps=True)
    assert g.upstream("L0H1", "MLP0") and not g.upstream("MLP0", "MLP0") and not g.upstream("L1H0", "L1H1.q")
    assert g.upstream("L0H0", "L1H1.k") and g.upstream("MLP1", "logits") and not g.upstream("MLP1", "L1H0.v")
    # embed: 4 heads x 3 + 2 MLPs + logits; layer-0 heads: 2 x (layer-1 heads x 3 + 2 MLPs + logits) ...
    assert len(g.edges) == len(set(g.edges))
    with pytest.raises(ConfigError, match="not upstream"):
        g.check_edge("L1H0", "L0H1.q")


def test_path_patching_equals_a_naive_hook_loop(codes):
    model, p = codes
    edges = [("L0H1", "L2H3.q"), ("MLP0", "L1H0.v"), ("embed", "MLP1"), ("L1H2", "MLP1"), ("MLP2", "logits")]
    pp = path_patching(model, p, edges=edges, progress=False)
    c = shuffle_labels(p, seed=0)
    rows = torch.arange(len(p))
    q = p.query_pos

    def metric(tokens, hooks):
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[rows, q]
        return logits.log_softmax(-1)[rows, p.answers[:, 0]]

    with torch.no_grad():
        _, cc = model.run_with_cache(p.tokens)
        _, ck = model.run_with_cache(c.tokens)

        def out(cache, s):
            if s == "embed":
                return cache["blocks.0.hook_resid_pre"]
            if s.startswith("MLP"):
                return cache[f"blocks.{s[3:]}.hook_mlp_out"]
            layer, h = map(int, s[1:].split("H"))
            return cache[f"blocks.{layer}.attn.hook_z"][:, :, h] @ model.W_O[layer, h]

        base = metric(c.tokens, [])
        bk = get_backend(model)  # a boot_native bridge (TL 4.x) gets its q/k/v fork from tvlens, not TL's setter
        bk.set_use_split_qkv_input(True)
        bk.set_use_hook_mlp_in(True)
        try:
            for (s, r), got in zip(edges, pp.per_prompt.T):
                d = out(cc, s) - out(ck, s)
                kind, layer, h = Graph.receiver_layer(r)
                if kind == "logits":
                    def hook(act, hook, d=d):
                        return act + d
                    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
                elif kind == "mlp":
                    def hook(act, hook, d=d):
                        return act + d
                    name = f"blocks.{layer}.hook_mlp_in"
                else:
                    def hook(act, hook, d=d, h=h):
                        act = act.clone()
                        act[:, :, h] += d
                        return act
                    name = f"blocks.{layer}.hook_{kind}_input"
                ref = metric(c.tokens, [(name, hook)]) - base
                assert torch.allclose(got, ref, atol=1e-4), (s, r, got, ref)
        finally:
            bk.set_use_split_qkv_input(False)
            bk.set_use_hook_mlp_in(False)
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in


def test_eap_edges_sum_to_the_node_estimate_and_nodes_match_atp(codes):
    """A head's EAP edges, summed over its receivers, are its node estimate (the residual stream is a sum);
    EAP-IG with one step is AtP at hook_z (attribution.py's own implementation)."""
    model, p = codes
    eap = edge_attribution(model, p, method="eap", progress=False, per_prompt=False)
    node = head_attribution(model, p, method="eap-ig", ig_steps=1, progress=False, per_task=False)
    atp = head_attribution(model, p, method="atp", atp_site="z", progress=False, per_task=False)
    assert torch.allclose(node.scores, atp.scores, atol=1e-4)
    summed = torch.zeros(4, 4)
    for (s, _), v in zip(eap.edges, eap.scores):
        if s.startswith("L"):
            layer, h = map(int, s[1:].split("H"))
            summed[layer, h] += v
    # head_attribution averages per task first; one prompt per task makes both plain means
    assert torch.allclose(summed, node.scores, atol=1e-4)
    mlp = torch.tensor(node.notes["mlp"])
    summed_mlp = torch.tensor([sum(float(v) for (s, _), v in zip(eap.edges, eap.scores) if s == f"MLP{L}")
                               for L in range(4)])
    assert torch.allclose(summed_mlp, mlp, atol=1e-4)


def test_eap_ig_completeness(codes):
    """Integrated gradients are complete: the embedding's attributions (its edges, summed) add up to the
    clean - corrupted metric gap as the steps grow; one gradient (EAP) does not."""
    model, p = codes
    pp = path_patching(model, p, edges=[("embed", "logits")], progress=False)
    gap = pp.notes["clean_metric"] - pp.notes["corrupted_metric"]

    def embed_total(steps):
        e = edge_attribution(model, p, method="eap-ig", ig_steps=steps, qk_fix=False, progress=False, per_prompt=False)
        return sum(float(v) for (s, _), v in zip(e.edges, e.scores) if s == "embed")
    one, many = embed_total(1), embed_total(40)
    assert abs(many - gap) <= 0.05 * abs(gap), (many, gap)
    assert abs(one - gap) > 3 * abs(many - gap), (one, many, gap)


def test_faithfulness_endpoints_and_monotone_top_circuit(codes):
    model, p = codes
    ig = edge_attribution(model, p, method="eap-ig", ig_steps=3, progress=False)
    n = len(ig)
    f = faithfulness(model, p, ig, ks=[0, 8, 64, n], n_random=2)
    assert abs(f.notes["full_graph_recovered"] - 1) < 1e-4 and abs(f.notes["empty_graph_recovered"]) < 1e-4
    assert abs(float(f.recovered[-1]) - 1) < 1e-4 and abs(float(f.recovered[0])) < 1e-4
    assert float(f.recovered[2]) > float(f.random[2].max())  # 64 top edges beat 64 random ones
    assert f.random.shape == (4, 2)
    with pytest.raises(ConfigError, match=f"0..{n}"):
        faithfulness(model, p, ig, ks=[n + 1])


def test_edge_scores_api_roundtrip(codes, tmp_path):
    model, p = codes
    e = edge_attribution(model, p, method="eap", ci=True, progress=False)
    assert e.ci.shape == (2, len(e)) and bool((e.ci[0] <= e.scores + 1e-6).all() & (e.scores <= e.ci[1] + 1e-6).all())
    top = e.top(5)
    assert len(top) == 5 and abs(top[0][2]) >= abs(top[-1][2])
    df = e.to_dataframe()
    assert list(df.columns[:4]) == ["sender", "receiver", "receiver_kind", "score"] and len(df) == len(e)
    e.save(tmp_path / "edges")
    back = EdgeScores.load(tmp_path / "edges")
    assert back.edges == e.edges and torch.equal(back.scores, e.scores) and torch.equal(back.ci, e.ci)
    with pytest.raises(ConfigError, match="k must be"):
        e.top(len(e) + 1)


def test_bad_inputs(codes):
    model, p = codes
    with pytest.raises(ConfigError, match="ig_steps"):
        head_attribution(model, p, method="eap-ig", ig_steps=0, progress=False)
    with pytest.raises(ConfigError, match="ig_steps"):
        edge_attribution(model, p, ig_steps=0, progress=False)
    with pytest.raises(ConfigError, match="not differentiable"):
        edge_attribution(model, p, metric="accuracy", progress=False)
    with pytest.raises(ConfigError, match="differentiable"):
        head_attribution(model, p, method="eap-ig", metric=lambda sel, ans: (sel.argmax(-1) == ans).float().sum(-1),
                         progress=False)
    with pytest.raises(ConfigError, match="not upstream"):
        path_patching(model, p, edges=[("L2H0", "L1H0.q")], progress=False)
    with pytest.raises(ConfigError, match="grad_drop"):
        head_attribution(model, p, method="patch", grad_drop=True, progress=False)
    one_shot = tvlens.model_info(model).task_family().sample(1, shots=1, seed=0)
    with pytest.raises(ConfigError, match="corrupted"):
        edge_attribution(model, one_shot, progress=False)
    reg = tvlens.tasks.get("sparse_regression").sample(2, seed=0)
    with pytest.raises(ConfigError, match="regression"):
        edge_attribution(model, reg, progress=False)


def test_graddrop_runs_and_is_a_magnitude(codes):
    model, p = codes
    gd = head_attribution(model, p, method="atp", grad_drop=True, progress=False)
    assert bool(torch.isfinite(gd.scores).all()) and bool((gd.scores >= 0).all()) and gd.notes["grad_drop"]


def test_eap_equals_transformerlens_4_edge_attribution(tmp_path):
    """Where TransformerLens 4 is installed (its attribution_patch has edge granularity), our EAP on a
    TransformerBridge equals TL's, summed over positions."""
    ap = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
    try:
        ap.EdgeAttributionConfig(granularity="edge")
    except NotImplementedError:
        pytest.skip("this TransformerLens (< 4) has no edge-granularity attribution_patch")
    model = _tiny_bridge(tmp_path)
    p, c = _random_promptset(model, n=2, seq=6, corrupt_at=(1, 3))
    ours = edge_attribution(model, p, method="eap", qk_fix=False, corrupted=c, metric="logprob", progress=False)
    rows = torch.arange(1)

    totals = {}
    for i in range(len(p)):
        ans = int(p.answers[i, 0])

        def metric_fn(logits, ans=ans):
            return logits[0, -1].log_softmax(-1)[ans]
        res = ap.attribution_patch(model, p.tokens[i:i + 1], c.tokens[i:i + 1], metric_fn,
                                   ap.EdgeAttributionConfig(granularity="edge"))
        for (w, r), v in res.edge_scores.items():
            totals[(w, r)] = totals.get((w, r), 0.0) + v / len(p)
    del rows

    def wname(n):
        return {"embed": "embed", "attn_head_out": f"L{n.layer}H{n.head}", "mlp_out": f"MLP{n.layer}"}[n.kind]

    def rname(n):
        if n.kind == "logits":
            return "logits"
        if n.kind == "mlp_in":
            return f"MLP{n.layer}"
        return f"L{n.layer}H{n.head}.{n.kind[0]}"

    tl = {}
    for (w, r), v in totals.items():
        key = (wname(w), rname(r))
        tl[key] = tl.get(key, 0.0) + v
    assert set(tl) == set(ours.edges)
    ref = torch.tensor([tl[e] for e in ours.edges])
    assert ref.abs().max() > 0 and (ours.scores - ref).abs().max() <= 1e-4 * ref.abs().max()


def _tiny_bridge(tmp_path):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=40)).eval()
    hf.save_pretrained(tmp_path / "m")
    model = TransformerBridge.boot_transformers(str(tmp_path / "m"), device="cpu")
    model.eval()
    return model


def test_eap_nodes_equal_transformerlens_attribution_patch_on_a_bridge(tmp_path):
    """On a TransformerBridge (the model class of both TransformerLens lines), EAP-IG with one step equals
    TransformerLens' own node attribution_patch (heads and MLPs, summed over positions): the backend seam's
    hooks, backward hooks and run-from-residual give TL's numbers."""
    ap = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
    model = _tiny_bridge(tmp_path)
    p, c = _random_promptset(model, n=3, seq=6, corrupt_at=(1, 3))
    ours = head_attribution(model, p, method="eap-ig", ig_steps=1, corrupted=c, metric="logprob", per_task=False,
                            progress=False)
    heads, mlp = torch.zeros(2, 2), torch.zeros(2)
    for i in range(len(p)):
        def metric_fn(logits, a=int(p.answers[i, 0])):
            return logits[0, -1].log_softmax(-1)[a]
        res = ap.attribution_patch(model, p.tokens[i:i + 1], c.tokens[i:i + 1], metric_fn)
        for node, v in res.node_scores.items():
            if node.kind == "attn_head_out":
                heads[node.layer, node.head] += v / len(p)
            elif node.kind == "mlp_out":
                mlp[node.layer] += v / len(p)
    assert heads.abs().max() > 0
    assert (ours.scores - heads).abs().max() <= 1e-4 * heads.abs().max()
    assert (torch.tensor(ours.notes["mlp"]) - mlp).abs().max() <= 1e-4 * mlp.abs().max()


def test_edges_on_a_native_bridge_equal_exact_path_patching():
    """A boot_native bridge (what tvlens builds on TL 4.x; backend='bridge' on 3.9 too) has no q/k/v fork in
    TransformerLens; tvlens gives it one (tvlens.backends.native_qkv), so edges run and EAP is exact where the
    model is linear in the receiver (as test_eap_equals_exact_path_patching_where_the_model_is_linear_in_the_receiver)."""
    from tvlens.backends.loading import build

    model = build(dict(n_layers=1, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=20, attn_only=True,
                       normalization_type=None, act_fn="gelu", d_mlp=None, seed=0), False, backend="bridge")
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(4.0)
    assert get_backend(model).kind == "bridge"
    p, c = _random_promptset(model, corrupt_at=(2, 5, 7))
    eap = edge_attribution(model, p, method="eap", corrupted=c, metric="logit", progress=False)
    pp = path_patching(model, p, corrupted=c, metric="logit", progress=False)
    lin = torch.tensor([k in ("v", "logits") for k in eap.receiver_kinds()])
    assert pp.per_prompt[:, lin].abs().max() > 1e-2 and pp.per_prompt[:, ~lin].abs().max() > 1e-2
    assert torch.allclose(eap.per_prompt[:, lin], pp.per_prompt[:, lin], rtol=1e-4,
                          atol=1e-4 * float(pp.per_prompt.abs().max()))
    assert not model.cfg.use_split_qkv_input  # switched off again after the call
