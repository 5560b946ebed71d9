"""Task vectors: per-task mean representations, tied to the model they came from; saved and checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from tvlens.backends import get_backend
from tvlens.errors import ConfigError
from tvlens.io import load_tensors_with_sidecar, save_tensors_with_sidecar
from tvlens.validate import _SKIPPED, _given, _where, check_finite, check_model


@dataclass
class TaskVectors:
    """Per-task mean representations ``[n_layers, n_tasks, d_model]``, tied to the model they came from."""

    vectors: Float[torch.Tensor, "layer task d_model"]
    layers: list[int]
    task_names: list[str]
    counts: torch.Tensor | None = None
    fingerprint: str = ""
    d_model: int = 0
    family: str = ""
    read_at: str = "query"  # where they were read, and so where ``run_patching`` patches them

    def __repr__(self) -> str:
        where = "" if self.read_at == "query" else f", read_at={self.read_at!r}"
        return f"TaskVectors(layers={self.layers}, tasks={self.task_names}, d_model={self.d_model}{where})"

    def get(self, task: str | int, layer: int) -> Float[torch.Tensor, "d_model"]:
        if isinstance(task, str) and task not in self.task_names:
            from tvlens.errors import UnknownNameError

            raise UnknownNameError(f"no task vector of task {task!r}; these hold tasks {self.task_names}")
        t = self.task_names.index(task) if isinstance(task, str) else int(task)
        if layer not in self.layers:
            raise ConfigError(f"no task vector at layer {layer}; these hold layers {self.layers}")
        return self.vectors[self.layers.index(layer), t]

    def check_model(self, model) -> None:
        """Refuse a model whose residual space these vectors do not live in (``check_vectors``:
        width, dtype, finite, and the model's fingerprint; vectors without one need ``unchecked("fingerprint")``)."""
        check_vectors(self, model, where="TaskVectors.check_model")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        tensors = {"vectors": self.vectors}
        if self.counts is not None:
            tensors["counts"] = self.counts
        meta = {"kind": type(self).__name__, "layers": self.layers, "task_names": self.task_names,
                "fingerprint": self.fingerprint, "d_model": self.d_model, "family": self.family, "read_at": self.read_at,
                **self._extra_meta()}
        return save_tensors_with_sidecar(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "TaskVectors":
        t, m = load_tensors_with_sidecar(path, expect_kind=cls.__name__)
        _check_vectors_artifact(t, m, f"{cls.__name__}.load({str(path)!r})")
        return cls(vectors=t["vectors"], counts=t.get("counts"), layers=list(m["layers"]),
                   task_names=list(m["task_names"]), fingerprint=m["fingerprint"], d_model=int(m["d_model"]),
                   family=m.get("family", ""), read_at=m.get("read_at", "query"), **cls._extra_from_meta(m))

    def _extra_meta(self) -> dict[str, Any]:
        """Sidecar fields a subclass adds (``FunctionVectors``: its heads)."""
        return {}

    @classmethod
    def _extra_from_meta(cls, meta: dict[str, Any]) -> dict[str, Any]:
        return {}


def _check_vectors_artifact(t: dict[str, torch.Tensor], m: dict[str, Any], where: str) -> None:
    """A TaskVectors file whose sidecar labels do not fit its stored rows is refused, never mislabelled."""
    from tvlens.errors import CheckpointError
    from tvlens.io import require_keys

    require_keys(m, {"layers": list, "task_names": list, "fingerprint": str, "d_model": int}, where)
    if "vectors" not in t or t["vectors"].ndim != 3:
        raise CheckpointError(f"{where}: the weights file holds no [layer, task, d_model] 'vectors' tensor")
    n_l, n_t, d = t["vectors"].shape
    layers, names = m["layers"], m["task_names"]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in layers) or len(set(layers)) != len(layers):
        raise CheckpointError(f"{where}: sidecar 'layers' must be distinct integers, got {layers}")
    if any(not isinstance(x, str) for x in names) or len(set(names)) != len(names):
        raise CheckpointError(f"{where}: sidecar 'task_names' must be distinct strings, got {names}")
    if (len(layers), len(names), m["d_model"]) != (n_l, n_t, d):
        raise CheckpointError(
            f"{where}: the sidecar describes {len(layers)} layers x {len(names)} tasks x d_model {m['d_model']} "
            f"but the stored vectors are {n_l} x {n_t} x {d}; the sidecar was edited or belongs to another file"
        )
    if "counts" in t and tuple(t["counts"].shape) not in ((n_t,), (n_l, n_t)):
        raise CheckpointError(f"{where}: stored counts {tuple(t['counts'].shape)} do not fit {n_t} tasks")


def check_vectors(vectors, model, prompts=None, where: str = ""):
    """Task vectors that live in ``model``'s residual space: float ``[layer, task, d_model]`` with the
    model's width, finite, from this model (fingerprint) and of the prompts' family. Returns the vectors,
    cast to the model's dtype when they are floats of another precision."""
    import dataclasses

    if not isinstance(vectors, TaskVectors):
        raise ConfigError(f"{_where(where)}vectors must be tvlens TaskVectors (extract(model, prompts).task_vectors(), "
                          f"or function_vector(...)), got {_given(vectors)}")
    v = vectors.vectors
    d = int(check_model(model, "model", where).d_model)
    if not torch.is_tensor(v) or not v.is_floating_point():
        raise ConfigError(f"{_where(where)}vectors.vectors must be a float tensor, got {_given(v)}")
    if vectors.d_model and int(vectors.d_model) != d:
        raise ConfigError(f"{_where(where)}task vectors have d_model={vectors.d_model} but the model has d_model={d}")
    shape = (len(vectors.layers), len(vectors.task_names), d)
    if tuple(v.shape) != shape:
        raise ConfigError(
            f"{_where(where)}vectors.vectors has shape {tuple(v.shape)} but must be [layers, tasks, d_model] = {shape} "
            f"({len(vectors.layers)} layers {vectors.layers}, tasks {vectors.task_names}, this model's d_model {d})"
        )
    have = [i for i, t in enumerate(vectors.task_names) if t in vector_tasks(vectors)]
    check_finite(v[:, have], "vectors.vectors", where, " (the task vectors of tasks with prompts)")
    if not vectors.fingerprint:
        if "fingerprint" not in _SKIPPED:
            raise ConfigError(
                f"{_where(where)}these task vectors carry no model fingerprint, so nothing says they come from this "
                "model: extract them from it (tvlens.extract(model, prompts).task_vectors()), or, vouching that "
                "they live in its residual space, run inside `with tvlens.validate.unchecked('fingerprint'):`"
            )
    else:
        fp = get_backend(model).fingerprint()
        if fp != vectors.fingerprint:
            raise ConfigError(
                f"{_where(where)}task vectors come from another model (fingerprint {vectors.fingerprint}, this model "
                f"{fp}); extract them from this model"
            )
    if (prompts is not None and vectors.family and prompts.family and vectors.family != prompts.family
            and "family" not in _SKIPPED):
        raise ConfigError(
            f"{_where(where)}task vectors come from prompts of family {vectors.family!r} but these prompts are "
            f"{prompts.family!r}; or run inside `with tvlens.validate.unchecked('family'):`"
        )
    dtype = next(model.parameters()).dtype
    if v.dtype != dtype and dtype.is_floating_point:
        vectors = dataclasses.replace(vectors, vectors=v.to(dtype))
    return vectors


def vector_tasks(vectors) -> list[str]:
    """The tasks whose vector was averaged over at least one prompt (``counts > 0``; all when counts are
    unknown). A task without prompts has a NaN vector (``TaskEncodings.task_vectors``), never zeros."""
    counts = getattr(vectors, "counts", None)
    if counts is None or len(counts) != len(vectors.task_names):
        return list(vectors.task_names)
    return [t for t, c in zip(vectors.task_names, counts.tolist()) if c > 0]


