"""Circuits: fast attribution of heads, MLPs and edges (EAP, EAP-IG, AtP + GradDrop), exact path patching,
and the faithfulness of the circuits they find.

The graph (as in Hanna et al. 2024 and TransformerLens 4's ``tools/analysis/attribution_patching``):

- **senders** write into the residual stream: ``"embed"`` (the residual entering block 0), each head
  ``"L{l}H{h}"`` (its output ``z @ W_O``), each MLP ``"MLP{l}"``;
- **receivers** read it: each head's query, key and value input ``"L{l}H{h}.q"`` / ``.k`` / ``.v``, each
  MLP's input ``"MLP{l}"``, and ``"logits"`` (the final residual); under grouped-query attention a key/value
  head's input is one receiver ``"L{l}KV{g}.k"`` / ``.v`` shared by the query heads of its group;
- an **edge** ``sender -> receiver`` exists when the sender is upstream: a head of layer ``l`` feeds the
  heads of later layers, the MLP of its own and later layers, and the logits; an MLP of layer ``l`` feeds
  everything of later layers; the embedding feeds everything.

An edge's value is the metric after **path patching** it (``path_patching``): in the corrupted run, only
that receiver's input gets the sender's clean-minus-corrupted output added (``input = corrupted input +
(clean sender - corrupted sender)``, at every position); every other component stays corrupted, and the
change flows on through everything downstream of the receiver. The number reported is ``patched -
corrupted`` (as ``head_attribution(method="patch")``). It runs on the batched sweep engine
(``tvlens.sweeps.activation_patching``): the senders are stacked along the batch axis and all edges into one
receiver type of one layer go through one engine call.

**EAP** estimates every edge at once: ``(clean sender - corrupted sender) . d metric / d receiver input``,
the gradient taken on the corrupted run (the denoising convention of TransformerLens 4, whose
``attribution_patch(granularity="edge")`` it equals, summed over positions). **EAP-IG** averages that
gradient over ``ig_steps`` runs whose input embeddings are interpolated from the corrupted to the clean
prompt (``alpha = k / ig_steps``, ``k = 0..ig_steps-1``, as ``hannamw/EAP-IG``), all in one batched
forward and backward. ``ig_steps=1`` is EAP.

Node scores (``head_attribution(method="eap-ig")``) are the same estimate at the head's output ``hook_z``
(and the MLP's ``hook_mlp_out``): of patching that one node's clean output into the corrupted run at every
position, the number ``method="patch"`` computes exactly.

The package, by concept: ``graph`` (senders, receivers, edges), ``gradients`` (prepared inputs, the
interpolated-gradient pass), ``scoring`` (node scores and ``edge_attribution``), ``paths`` (exact
``path_patching``), ``faithful`` (``circuit_metric``, ``faithfulness``), ``results`` (``HeadScores``,
``EdgeScores``, ``Faithfulness``). Where prompts are read and patched: ``tvlens.positions``.
"""

from __future__ import annotations

from tvlens.circuits.faithful import circuit_metric, faithfulness
from tvlens.circuits.gradients import DEFAULT_IG_STEPS, IG_RULE, ig_alphas, swap_contexts
from tvlens.circuits.graph import RECEIVER_KINDS, Graph, graph_of
from tvlens.circuits.paths import path_patching
from tvlens.circuits.results import EdgeScores, Faithfulness, HeadScores
from tvlens.circuits.scoring import edge_attribution, head_scores, node_attribution

__all__ = ["DEFAULT_IG_STEPS", "IG_RULE", "RECEIVER_KINDS", "EdgeScores", "Faithfulness", "Graph", "HeadScores",
           "circuit_metric", "edge_attribution", "faithfulness", "graph_of", "head_scores", "ig_alphas",
           "node_attribution", "path_patching", "swap_contexts"]
