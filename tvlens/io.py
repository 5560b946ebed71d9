"""Artifacts on disk: safetensors + a JSON sidecar, written atomically. Never pickle."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tvlens.errors import CheckpointError


def _stem(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors_with_sidecar(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` (with the weights' sha256); returns the stem."""
    stem = _stem(path)
    st = stem.with_suffix(".safetensors")
    atomic_save_tensors(st, tensors)
    meta = dict(meta)
    meta["weights_sha256"] = file_sha256(st)
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(meta, indent=1, default=_json_default).encode())
    return stem


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    stem = _stem(path)
    js = stem.with_suffix(".json")
    if not js.exists():
        raise CheckpointError(f"missing sidecar {js}: a tvlens artifact is <name>.safetensors + <name>.json")
    try:
        return json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"sidecar {js} is not valid JSON: {e}") from e


def load_tensors_with_sidecar(
    path: str | Path, expect_kind: str | None = None, verify_hash: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    stem = _stem(path)
    st = stem.with_suffix(".safetensors")
    if not st.exists():
        raise CheckpointError(f"missing weights file {st}")
    meta = read_sidecar(stem)
    if expect_kind is not None and meta.get("kind") != expect_kind:
        raise CheckpointError(f"{stem}.json describes a {meta.get('kind')!r}, expected a {expect_kind!r}")
    if verify_hash and "weights_sha256" in meta:
        actual = file_sha256(st)
        if actual != meta["weights_sha256"]:
            raise CheckpointError(
                f"{st} does not match its sidecar {stem}.json: sha256 {actual[:12]}... but the sidecar "
                f"records {meta['weights_sha256'][:12]}...; the files come from different saves"
            )
    return load_file(str(st)), meta
