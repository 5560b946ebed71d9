"""The one seam to TransformerLens: :func:`get_backend` turns a model into a :class:`Backend`.

Two implementations: :class:`HookedBackend` (``HookedTransformer``, TransformerLens 3.x) and
:class:`BridgeBackend` (``TransformerBridge``, TransformerLens 3.9+ and 4.x). Nothing outside this
package knows a model class.
"""

from __future__ import annotations

from typing import Any

from tvlens.backends.protocol import Backend, layer_of, resid_name

_ATTR = "_tvlens_backend"


def get_backend(model: Any) -> Backend:
    """The backend of a HookedTransformer or TransformerBridge (cached on the model)."""
    bk = getattr(model, "__dict__", {}).get(_ATTR)
    if bk is not None:
        return bk
    from tvlens.backends.bridge import BridgeBackend, bridge_classes
    from tvlens.backends.hooked import HookedBackend, hooked_classes

    if hooked_classes() and isinstance(model, hooked_classes()):
        bk = HookedBackend(model)
    elif bridge_classes() and isinstance(model, bridge_classes()):
        bk = BridgeBackend(model)
    elif type(model).__name__ == "RemoteBridge":
        from tvlens.errors import UnsupportedModelError

        raise UnsupportedModelError(
            "model: a RemoteBridge (vLLM / Inspect engine) is not supported by this tvlens yet: its hooks are "
            "capture and affine-intervention specs sent to the engine, and tvlens' backends run Python hooks and "
            "blocks in-process. Boot the same weights with TransformerBridge.boot_transformers(folder) (or "
            "tvlens.load_model(folder, backend='bridge', device_map='auto') across GPUs)"
        )
    else:
        from tvlens.errors import UnsupportedModelError

        supported = ["transformer_lens.HookedTransformer (TransformerLens 3.x)"] if hooked_classes() else []
        supported.append("transformer_lens.model_bridge.TransformerBridge")
        raise UnsupportedModelError(
            f"model: tvlens cannot drive a {type(model).__module__}.{type(model).__name__}; it takes "
            f"{' or '.join(supported)}. Load one with tvlens.load_model(...), or wrap a Hugging Face model "
            "with TransformerBridge.boot_transformers(folder)"
        )
    model.__dict__[_ATTR] = bk  # not Module.__setattr__: a backend is no submodule
    return bk


def has_hooked_transformer() -> bool:
    """Whether this TransformerLens has HookedTransformer (3.x; 4.0 removed it)."""
    from tvlens.backends.hooked import hooked_classes

    return bool(hooked_classes())


def tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


__all__ = ["Backend", "get_backend", "has_hooked_transformer", "layer_of", "resid_name", "tl_version"]
