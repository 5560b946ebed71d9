"""Extraction: the residual stream at each prompt's query position (or its examples' answers), per layer."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from tvlens.accuracy import batches, check_prompts_fit
from tvlens.backends import get_backend, resid_name
from tvlens.encoding.vectors import TaskVectors
from tvlens.errors import ConfigError, TvlensError
from tvlens.positions import check_at, representation_mask
from tvlens.prompts import PromptSet


# --------------------------------------------------------------------------- layers and hooks
def n_resid_layers(model) -> int:
    return get_backend(model).n_layers + 1


resid_hook_name = resid_name  # the hook whose output is the residual stream at ``layer`` (0 = embedding)


def check_layers(model, layers: Sequence[int] | int | None) -> list[int]:
    n = n_resid_layers(model)
    if layers is None:
        return list(range(n))
    if isinstance(layers, str):
        from tvlens.validate import int_list

        int_list(layers, "layers", 0, n - 1, what=" (residual layers: 0 = embedding, l = output of block l-1)")
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n:
            raise ConfigError(
                f"layer {layer!r} is out of range: this model has layers 0..{n - 1} "
                f"(0 = embedding, l = output of block l-1)"
            )
        out.append(int(layer))
    if not out:
        raise ConfigError("layers is empty: name at least one layer")
    return out


def model_fingerprint(model) -> str:
    """A short hash of the model's shape and a sample of its weights in canonical form: which residual
    space vectors live in (the same for a HookedTransformer and a raw TransformerBridge holding the same
    weights; different for a processed copy, e.g. a bridge in compatibility mode)."""
    return get_backend(model).fingerprint()


# --------------------------------------------------------------------------- extraction


@torch.no_grad()
def extract(
    model,
    prompts: PromptSet,
    layers: Sequence[int] | int | None = None,
    batch_size: int | None = 256,
    progress: bool = True,
    at: str = "query",
) -> "TaskEncodings":
    """The residual stream at each prompt's query position, at every requested layer.

    Only the query position of the requested hooks is kept (never a full cache), the forward pass
    stops after the last requested layer, and positions after the query are not computed, so
    memory is ``n_prompts x n_layers x d_model`` plus one batch's forward pass.

    ``at="answers"`` reads the mean over the examples' answer tokens instead of the query position
    (``representation_mask``): where a model that does not route its task through the query keeps it.
    """
    check_prompts_fit(model, prompts, "extract")
    layers = check_layers(model, layers)
    check_at(at)
    if at != "query":
        representation_mask(prompts, at)  # refuse prompts without examples before any work
    bk = get_backend(model)
    names = {resid_hook_name(layer): i for i, layer in enumerate(layers)}
    device = bk.input_device
    out = torch.full((len(prompts), len(layers), bk.d_model), float("nan"), dtype=torch.float32)
    # layer l is the input of block l: run blocks 0..l-1 only (layer 0 is read by a hook at the start of
    # block 0, so that block runs; and never the unembedding)
    stop = min(max(max(layers), 1), bk.n_layers)
    it, bs = batches(len(prompts), batch_size, "extract", progress)
    for s in it:
        sub = prompts.subset(slice(s, s + bs)).to(device)
        rows = torch.arange(len(sub), device=device)
        q = sub.query_pos

        # hooks close over their layer's column (a bridge's hook.name is its own spelling)
        if at == "query":
            def keep(act, hook, _rows=rows, _q=q, _s=s, _col=0):
                out[_s : _s + len(_rows), _col] = act[_rows.to(act.device), _q.to(act.device)].float().cpu()
        else:
            w = representation_mask(sub, at).float()
            w = w / w.sum(1, keepdim=True)

            def keep(act, hook, _w=w, _s=s, _col=0):
                out[_s : _s + len(_w), _col] = torch.einsum("bp,bpd->bd", _w.to(act.device),
                                                             act[:, : _w.shape[1]].float()).cpu()

        fwd_hooks = [(n, functools.partial(keep, _col=col)) for n, col in names.items()]
        x = sub.model_input[:, : int(q.max()) + 1]
        # residual reads only: SDPA on a bridge where exact; the last block's MLP only at the query
        # positions (the final layer is read nowhere else)
        with bk.prefer_fast_attention(), bk.fast_kernels(), bk.last_block_reads(q if at == "query" else None):
            bk.run_with_hooks(x, fwd_hooks=fwd_hooks, stop_at_layer=stop)
    if bool(out.isnan().any()):  # a hook that never fired (or a model that produced NaN): never return garbage
        raise TvlensError(f"extract: no residual was read (or it is NaN) at some of layers {layers}; "
                          "the model's forward pass did not run the hooks these layers need")
    return TaskEncodings(
        acts=out,
        layers=layers,
        labels=prompts.labels.cpu().clone(),
        task_names=list(prompts.task_names),
        fingerprint=model_fingerprint(model),
        d_model=bk.d_model,
        family=prompts.family,
        read_at=at,
    )


@dataclass
class TaskEncodings:
    """Representations ``[n_prompts, n_layers, d_model]`` with the prompts' task labels."""

    acts: Float[torch.Tensor, "n layer d_model"]
    layers: list[int]
    labels: Int[torch.Tensor, "n"]
    task_names: list[str]
    fingerprint: str = ""
    d_model: int = 0
    family: str = ""
    read_at: str = "query"  # where each prompt's representation was read (``representation_mask``)

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    def __repr__(self) -> str:
        return (f"TaskEncodings(n={len(self)}, layers={self.layers}, d_model={self.acts.shape[-1]}, "
                f"tasks={self.task_names})")

    def at(self, layer: int) -> Float[torch.Tensor, "n d_model"]:
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} was not extracted; these encodings hold layers {self.layers}")
        return self.acts[:, self.layers.index(layer)]

    def task_vectors(self, layer: int | Sequence[int] | None = None) -> "TaskVectors":
        """Per-task mean representation at ``layer`` (all extracted layers when None)."""
        layers = self.layers if layer is None else ([layer] if isinstance(layer, int) else list(layer))
        idx = [self.layers.index(L) if L in self.layers else -1 for L in layers]
        if -1 in idx:
            raise ConfigError(f"layers {layers} not all extracted; these encodings hold layers {self.layers}")
        # a task without prompts has no mean: NaN (``counts`` 0), never a zero vector that patches as one
        vecs = torch.full((len(layers), len(self.task_names), self.acts.shape[-1]), float("nan"))
        counts = torch.zeros(len(self.task_names), dtype=torch.long)
        for t in range(len(self.task_names)):
            m = self.labels == t
            counts[t] = int(m.sum())
            if counts[t]:
                vecs[:, t] = self.acts[m][:, idx].mean(0)
        return TaskVectors(vectors=vecs, layers=layers, task_names=list(self.task_names), counts=counts,
                           fingerprint=self.fingerprint, d_model=self.acts.shape[-1], family=self.family, read_at=self.read_at)

    def project(self, layer: int, method: str = "pca", n_components: int = 2, seed: int = 0):
        """Low-dimensional projection at ``layer`` (``pca``, ``tsne``; ``umap`` with umap-learn) as a DataFrame."""
        import pandas as pd

        X = self.at(layer).numpy()
        if method == "pca":
            from sklearn.decomposition import PCA

            Y = PCA(n_components=n_components, random_state=seed).fit_transform(X)
        elif method == "tsne":
            from sklearn.manifold import TSNE

            Y = TSNE(n_components=n_components, random_state=seed, perplexity=min(30.0, len(X) / 4)).fit_transform(X)
        elif method == "umap":
            try:
                import umap
            except ImportError as e:
                raise ConfigError("method='umap' needs umap-learn: pip install 'tvlens[umap]'") from e
            Y = umap.UMAP(n_components=n_components, random_state=seed).fit_transform(X)
        else:
            raise ConfigError(f"unknown projection method {method!r}; use 'pca', 'tsne' or 'umap'")
        df = pd.DataFrame(Y, columns=[f"{method}{i + 1}" for i in range(n_components)])
        df["task"] = [self.task_names[int(t)] for t in self.labels]
        return df

    def plot_projection(self, layer: int, method: str = "pca", seed: int = 0):
        """A 2-D projection coloured by task: ``tvlens.views.encodings_scatter_figure``."""
        from tvlens.plotting import encodings_scatter_figure

        return encodings_scatter_figure(self, layer, method, seed)

    def plot(self, layer: int | None = None, method: str = "pca", seed: int = 0):
        """The encodings scatter at ``layer`` (default: the last extracted layer)."""
        return self.plot_projection(self.layers[-1] if layer is None else layer, method, seed)
