"""Artifacts on disk: safetensors + a JSON sidecar, written atomically. Never pickle."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tvlens.checks import atomic_write, check_out_path, check_writable_parent
from tvlens.errors import CheckpointError, ConfigError, OverwriteError


def _stem(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``checks.atomic_write``: one implementation of the temp-file, fsync and ``os.replace`` write."""
    atomic_write(Path(path), data)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors themselves (names, dtypes, shapes, values), independent of the file layout."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors_with_sidecar(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, overwrite: bool = False
) -> Path:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` (with the weights' sha256); returns the stem.

    The safetensors header also records the sidecar's fields and a hash of the tensors, so a sidecar
    edited afterwards (task names reordered, another step's sidecar) is caught on load. An existing
    artifact at ``path`` is refused unless ``overwrite=True``; a folder or an empty name is refused.
    """
    stem = _stem(check_out_path(path, "path", where="save"))
    if stem.is_dir():
        raise ConfigError(
            f"save: path {str(path)!r} is an existing folder; give a file name (without extension), "
            f"e.g. {str(stem / 'vectors')!r}"
        )
    if stem.name in ("", ".", ".."):
        raise ConfigError(f"save: path {str(path)!r} has no file name; give e.g. 'out/vectors'")
    check_writable_parent(stem, "path", where="save")
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for f in (st, js):
        if f.is_dir():
            raise ConfigError(f"save: {f} is a folder; choose another name")
        if f.exists() and not overwrite:
            raise OverwriteError(
                f"save: {f} already exists; tvlens does not overwrite files: choose another path, or pass "
                "overwrite=True to replace this artifact"
            )
    meta = json.loads(json.dumps(dict(meta), default=_json_default))
    meta.pop("weights_sha256", None)
    header = {"tvlens.meta": json.dumps(meta, sort_keys=True), "tvlens.content_sha256": content_sha256(tensors)}
    atomic_save_tensors(st, tensors, header)
    meta["weights_sha256"] = file_sha256(st)
    atomic_write_bytes(js, json.dumps(meta, indent=1).encode())
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
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"sidecar {js} is not valid JSON ({e}); it was truncated or is not a tvlens sidecar") from e
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"sidecar {js} holds a JSON {type(meta).__name__}, expected an object with 'kind' and the "
            "artifact's fields; it is not a tvlens sidecar"
        )
    return meta


def require_keys(meta: dict[str, Any], keys: dict[str, type | tuple[type, ...]], where: str) -> None:
    """Refuse a sidecar that lacks one of ``keys`` or holds a value of another type."""
    missing = [k for k in keys if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: the sidecar lacks {missing}; it is incomplete or not a tvlens artifact of this kind")
    for k, typ in keys.items():
        if not isinstance(meta[k], typ) or isinstance(meta[k], bool) and typ is not bool:
            raise CheckpointError(f"{where}: sidecar field {k!r} must be {typ}, got {meta[k]!r}")


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def load_tensors_with_sidecar(
    path: str | Path, expect_kind: str | None = None, verify_hash: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``<stem>.safetensors`` and its sidecar, checking that they belong together: the sidecar's
    ``weights_sha256`` (or, without it, the hash of the tensors the header records) and the sidecar
    fields the header records. ``verify_hash=False`` skips both (for files you trust)."""
    stem = _stem(path)
    st = stem.with_suffix(".safetensors")
    if not st.is_file():
        raise CheckpointError(f"missing weights file {st}")
    meta = read_sidecar(stem)
    if expect_kind is not None and meta.get("kind") != expect_kind:
        raise CheckpointError(f"{stem}.json describes a {meta.get('kind')!r}, expected a {expect_kind!r}")
    try:
        with safe_open(str(st), "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(st))
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on a bad file
        raise CheckpointError(f"{st} cannot be read: it is truncated or not a safetensors file ({e})") from e
    if not verify_hash:
        return tensors, meta
    saved_meta = None
    if "tvlens.meta" in header:
        try:
            saved_meta = json.loads(header["tvlens.meta"])
        except json.JSONDecodeError:
            saved_meta = None
    if "weights_sha256" in meta:
        actual = file_sha256(st)
        if actual != meta["weights_sha256"]:
            raise CheckpointError(
                f"{st} does not match its sidecar {stem}.json: sha256 {actual[:12]}... but the sidecar "
                f"records {str(meta['weights_sha256'])[:12]}...; the files come from different saves "
                "(or the weights were changed or cut)"
            )
    elif "tvlens.content_sha256" in header:
        if content_sha256(tensors) != header["tvlens.content_sha256"]:
            raise CheckpointError(f"{st}: its tensors do not match the hash its header records; the file was altered")
    else:
        raise CheckpointError(
            f"{stem}.json records no weights_sha256 and {st.name} carries no tvlens hash, so tvlens cannot tell "
            "whether these weights belong to this sidecar (e.g. another step's weights). Restore the sidecar "
            "from where the run was written, or, if you trust the pair, load with verify=False"
        )
    if isinstance(saved_meta, dict):
        diff = [k for k in sorted(set(saved_meta) | set(meta) - {"weights_sha256"})
                if k != "weights_sha256" and not _same(saved_meta.get(k), meta.get(k))]
        if diff:
            shown = "; ".join(
                f"{k}: sidecar {json.dumps(meta.get(k))[:60]} but saved {json.dumps(saved_meta.get(k))[:60]}" for k in diff[:4]
            )
            raise CheckpointError(
                f"{stem}.json was edited after it was saved or belongs to another save ({shown}); the weights "
                "file records the original fields: restore the sidecar, or re-save the artifact"
            )
    return tensors, meta
