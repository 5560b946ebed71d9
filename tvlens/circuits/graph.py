"""The edge graph of one model shape: senders, receivers and the edges between them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvlens.backends import get_backend
from tvlens.errors import ConfigError

RECEIVER_KINDS = ("q", "k", "v", "mlp", "logits")


# --------------------------------------------------------------------------- the edge graph
@dataclass(frozen=True)
class Graph:
    """Senders, receivers and the edges between them of one model shape (see the module docstring)."""

    n_layers: int
    n_heads: int
    mlps: bool = True
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: one per query head)

    @property
    def grouped(self) -> bool:
        """Whether keys and values come from fewer heads than queries (grouped-query attention)."""
        return self.n_kv_heads is not None and self.n_kv_heads != self.n_heads

    def receiver_heads(self, kind: str) -> int:
        """How many receivers of kind ``q``/``k``/``v`` a layer has (key/value heads for k and v under GQA)."""
        return self.n_kv_heads if self.grouped and kind in ("k", "v") else self.n_heads

    def receiver_name(self, layer: int, kind: str, head: int) -> str:
        """``L{l}H{h}.q``; ``L{l}H{h}.k`` / ``.v``, or under GQA ``L{l}KV{g}.k`` / ``.v`` (key/value head g)."""
        if self.grouped and kind in ("k", "v"):
            return f"L{layer}KV{head}.{kind}"
        return f"L{layer}H{head}.{kind}"

    def query_heads(self, receiver: str) -> list[int]:
        """The query heads that read a q/k/v receiver: itself, or under GQA the group of a key/value head."""
        kind, _, h = self.receiver_layer(receiver)
        if kind not in ("q", "k", "v"):
            return []
        if self.grouped and kind in ("k", "v"):
            rep = self.n_heads // self.n_kv_heads
            return list(range(h * rep, (h + 1) * rep))
        return [h]

    @property
    def senders(self) -> list[str]:
        out = ["embed"]
        for l in range(self.n_layers):
            out += [f"L{l}H{h}" for h in range(self.n_heads)] + ([f"MLP{l}"] if self.mlps else [])
        return out

    @property
    def receivers(self) -> list[str]:
        out = []
        for l in range(self.n_layers):
            for k in "qkv":
                out += [self.receiver_name(l, k, h) for h in range(self.receiver_heads(k))]
            if self.mlps:
                out.append(f"MLP{l}")
        return out + ["logits"]

    @staticmethod
    def sender_layer(s: str) -> tuple[str, int, int | None]:
        """(kind, layer, head) of a sender: kind ``embed`` (layer -1), ``head`` or ``mlp``."""
        if s == "embed":
            return "embed", -1, None
        if s.startswith("MLP") and s[3:].isdigit():
            return "mlp", int(s[3:]), None
        if s.startswith("L") and "H" in s:
            a, b = s[1:].split("H", 1)
            if a.isdigit() and b.isdigit():
                return "head", int(a), int(b)
        raise ConfigError(f"unknown sender {s!r}: senders are 'embed', 'L{{layer}}H{{head}}' or 'MLP{{layer}}'")

    @staticmethod
    def receiver_layer(r: str) -> tuple[str, int, int | None]:
        """(kind, layer, head) of a receiver: kind ``q``/``k``/``v``, ``mlp`` or ``logits`` (layer n_layers)."""
        if r == "logits":
            return "logits", 10**9, None
        if r.startswith("MLP") and r[3:].isdigit():
            return "mlp", int(r[3:]), None
        if "." in r:
            head, k = r.rsplit(".", 1)
            if k in ("k", "v") and head.startswith("L") and "KV" in head:
                a, b = head[1:].split("KV", 1)
                if a.isdigit() and b.isdigit():
                    return k, int(a), int(b)
            if k in ("q", "k", "v"):
                try:
                    kind, l, h = Graph.sender_layer(head)
                except ConfigError:
                    kind = None
                if kind == "head":
                    return k, l, h
        raise ConfigError(f"unknown receiver {r!r}: receivers are 'L{{layer}}H{{head}}.q' (.k, .v; under grouped-query "
                          "attention 'L{{layer}}KV{{kv_head}}.k' / '.v'), 'MLP{{layer}}' or 'logits'")

    @staticmethod
    def upstream(sender: str, receiver: str) -> bool:
        sk, sl, _ = Graph.sender_layer(sender)
        rk, rl, _ = Graph.receiver_layer(receiver)
        if sk == "embed" or rk == "logits":
            return True
        if rk == "mlp":
            return sl < rl or (sk == "head" and sl == rl)
        return sl < rl

    @property
    def edges(self) -> list[tuple[str, str]]:
        return [(s, r) for r in self.receivers for s in self.senders if self.upstream(s, r)]

    def check_edge(self, sender: str, receiver: str) -> None:
        for name, known in ((sender, self.senders), (receiver, self.receivers)):
            if name not in known:
                kv = f", {self.n_kv_heads} key/value heads (receivers 'L{{l}}KV{{g}}.k' / '.v')" if self.grouped else ""
                raise ConfigError(f"edge ({sender!r}, {receiver!r}): {name!r} is not in this model's graph "
                                  f"({self.n_layers} layers x {self.n_heads} heads{kv}{', MLPs' if self.mlps else ''})")
        if not self.upstream(sender, receiver):
            raise ConfigError(f"edge ({sender!r}, {receiver!r}): the sender is not upstream of the receiver (a head "
                              "of layer l feeds heads of later layers, the MLP of layer l and later, and the logits; "
                              "an MLP of layer l feeds later layers); pick a receiver downstream of the sender")


def graph_of(model) -> Graph:
    """The edge graph of a model (key/value heads as receivers under grouped-query attention)."""
    bk = get_backend(model)
    kv = bk.n_key_value_heads
    kv = int(kv) if kv and int(kv) != bk.n_heads else None
    if kv is not None and bk.n_heads % kv:
        from tvlens.errors import UnsupportedModelError

        raise UnsupportedModelError(f"model: {bk.n_heads} query heads do not split into groups of {kv} key/value heads")
    return Graph(bk.n_layers, bk.n_heads, _has_mlps(bk), kv)


def check_layers(graph: Graph, layers) -> list[int] | None:
    """``layers`` (None, an int or integers in 0..n_layers-1) as a sorted list, or None."""
    from tvlens.checks import int_list

    out = int_list(layers, "layers", 0, graph.n_layers - 1, what=f" (the model has {graph.n_layers} layers)")
    return None if out is None else sorted(set(out))


def edges_in_layers(graph: Graph, layers) -> list[tuple[str, str]]:
    """The edges whose two ends are each the embedding, the logits, or a head or MLP of one of ``layers``."""
    keep = set(check_layers(graph, layers))

    def inside(kind, layer):
        return kind in ("embed", "logits") or layer in keep
    return [(s, r) for s, r in graph.edges
            if inside(*Graph.sender_layer(s)[:2]) and inside(*Graph.receiver_layer(r)[:2])]


def _receiver_kind(r: str) -> str:
    return Graph.receiver_layer(r)[0]


def _has_mlps(bk) -> bool:
    from tvlens.errors import HookError

    for name in ("blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_in"):  # an attention-only model still has hook_mlp_out
        try:
            bk.hook_name(name)
            return True
        except HookError:
            pass
    return False


def _sender_outputs(bk, w: dict[str, torch.Tensor], graph: Graph) -> torch.Tensor:
    """Every sender's write to the residual stream ``[b, pos, n_senders, d_model]`` (graph order)."""
    W_O = bk.W_O
    outs = [w["blocks.0.hook_resid_pre"][:, :, None]]
    for l in range(graph.n_layers):
        z = w[f"blocks.{l}.attn.hook_z"]
        outs.append(torch.einsum("bphd,hdm->bphm", z, W_O[l].to(z.dtype)))
        if graph.mlps:
            outs.append(w[f"blocks.{l}.hook_mlp_out"][:, :, None])
    return torch.cat(outs, 2)


def _receiver_hooks(graph: Graph) -> list[tuple[str, str, int | None, str]]:
    """(receiver name, canonical hook, head index, kind) in graph order (logits last, hook ``final``)."""
    out = []
    for l in range(graph.n_layers):
        for k in "qkv":  # under GQA, k and v receivers index the key/value heads of hook_k_input / hook_v_input
            out += [(graph.receiver_name(l, k, h), f"blocks.{l}.hook_{k}_input", h, k)
                    for h in range(graph.receiver_heads(k))]
        if graph.mlps:
            out.append((f"MLP{l}", f"blocks.{l}.hook_mlp_in", None, "mlp"))
    return out + [("logits", "final", None, "logits")]


class _EdgeFlags:
    """Turn on the split q/k/v inputs and hook_mlp_in for the duration (restored after)."""

    def __init__(self, bk, mlps: bool):
        self.bk, self.mlps = bk, mlps

    def __enter__(self):
        self.old = (self.bk.set_use_split_qkv_input(True), self.bk.set_use_hook_mlp_in(True) if self.mlps else None)
        return self

    def __exit__(self, *exc):
        self.bk.set_use_split_qkv_input(self.old[0])
        if self.mlps:
            self.bk.set_use_hook_mlp_in(self.old[1])
