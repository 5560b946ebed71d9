"""Argument checks shared by every public function: one meaning per argument, one wording per error.

A low module (imports only ``tvlens.errors``): tasks, io, train, the CLI and the analyses can all use
it. Every check names the argument, says what was expected and what was given, and returns the
normalised value::

    batch_size = check_batch_size(batch_size)          # a positive int, or None for "all at once"
    seed = check_seed(seed)                            # an int >= 0 (not a bool, not a string)
    tasks = check_names(tasks, "tasks")                # a list of names; a bare string is one name
    lr = check_float(lr, "lr", minimum=0, strict=True) # finite, > 0
    check_memory(estimated_bytes, "sampling 10^7 prompts", "n_per_task")  # before allocating

``where`` prefixes the message with the function or class the argument belongs to
(``"train: lr must be ..."``). Wrong types raise ``ArgumentTypeError`` (a ``ConfigError`` and a
``TypeError``), bad values ``ConfigError``, memory ``ResourceError``.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from tvlens.errors import ArgumentTypeError, ConfigError, ResourceError

MAX_SEED = 2**63 - 1


def _pre(where: str) -> str:
    return f"{where}: " if where else ""


def _show(value: Any) -> str:
    r = repr(value)
    return (r[:80] + "...") if len(r) > 80 else r


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    # 0-d integer tensors / numpy scalars
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(value, "ndim", 1) == 0:
        is_fp = getattr(value, "is_floating_point", None)
        if callable(is_fp):
            return not is_fp() and "bool" not in str(dtype) and "complex" not in str(dtype)
        return getattr(dtype, "kind", "") in "iu"
    return False


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    where: str = "",
    hint: str = "",
) -> int:
    """An integer (not a bool, float or string) in ``[minimum, maximum]``."""
    rng = (
        f" in {minimum}..{maximum}" if minimum is not None and maximum is not None
        else f" >= {minimum}" if minimum is not None
        else f" <= {maximum}" if maximum is not None
        else ""
    )
    if not _is_int(value):
        raise ArgumentTypeError(
            f"{_pre(where)}{name} must be an integer{rng}, got {_show(value)} ({type(value).__name__})"
            + (f"; {hint}" if hint else "")
        )
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ConfigError(f"{_pre(where)}{name} must be an integer{rng}, got {v}" + (f"; {hint}" if hint else ""))
    return v


def check_optional_int(value: Any, name: str, *, minimum: int | None = None, where: str = "", hint: str = "") -> int | None:
    return None if value is None else check_int(value, name, minimum=minimum, where=where, hint=hint)


def check_seed(seed: Any, name: str = "seed", *, where: str = "", maximum: int | None = MAX_SEED) -> int:
    """A seed: an integer in ``0..2**63-1`` (numpy and torch both accept it; ``maximum=None`` for numpy
    alone, which takes any non-negative integer)."""
    return check_int(seed, name, minimum=0, maximum=maximum, where=where, hint="seeds are non-negative integers")


def check_batch_size(batch_size: Any, argument: str = "batch_size", where: str = "", *, allow_none: bool = True) -> int | None:
    """The one meaning of ``batch_size`` in tvlens: a positive int (prompts per forward pass), or ``None``
    for all prompts in one batch (where a function allows it). 0 and negatives are errors, never "all"."""
    if batch_size is None:
        if allow_none:
            return None
        raise ConfigError(f"{_pre(where)}{argument} must be a positive integer, got None")
    hint = "a positive number of prompts per forward pass" + (", or None for all at once" if allow_none else "")
    return check_int(batch_size, argument, minimum=1, where=where, hint=hint)


def check_float(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = False,
    where: str = "",
    allow_none: bool = False,
) -> float | None:
    """A finite real number (not a bool, not NaN or inf) ``>= minimum`` (``> minimum`` when ``strict``)."""
    if value is None and allow_none:
        return None
    op = ">" if strict else ">="
    rng = f" {op} {minimum}" if minimum is not None else ""
    if maximum is not None:
        rng += f"{' and' if rng else ''} <= {maximum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if not (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
            raise ArgumentTypeError(f"{_pre(where)}{name} must be a finite number{rng}, got {_show(value)} ({type(value).__name__})")
        value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{_pre(where)}{name} must be a finite number{rng}, got {_show(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{_pre(where)}{name} must be a finite number{rng}, got {v}")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        raise ConfigError(f"{_pre(where)}{name} must be a finite number{rng}, got {v}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"{_pre(where)}{name} must be a finite number{rng}, got {v}")
    return v


def check_choice(value: Any, name: str, choices: Iterable[str], *, where: str = "") -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{_pre(where)}{name} must be one of {choices}, got {_show(value)}")
    return value


def check_names(
    value: Any,
    name: str,
    *,
    known: Sequence[str] | None = None,
    where: str = "",
    allow_index: bool = False,
    allow_empty: bool = False,
) -> list:
    """A list of names. A bare string is one name (``tasks="color"`` means ``["color"]``, never the
    letters c, o, l...); anything that is not a string (or an int index, with ``allow_index``) is refused."""
    if isinstance(value, str):
        items: list = [value]
    elif isinstance(value, (bytes, dict)) or not isinstance(value, Iterable):
        raise ArgumentTypeError(f"{_pre(where)}{name} must be a name or a list of names, got {_show(value)} ({type(value).__name__})")
    else:
        items = list(value)
    out = []
    for it in items:
        if isinstance(it, str):
            if known is not None and it not in known:
                raise ConfigError(f"{_pre(where)}{name}: unknown name {it!r}; known: {list(known)}")
            out.append(it)
        elif allow_index and _is_int(it):
            out.append(int(it))
        else:
            want = "names (strings) or indices" if allow_index else "names (strings)"
            raise ArgumentTypeError(f"{_pre(where)}{name} must hold {want}, got {_show(it)} ({type(it).__name__}) in {_show(value)}")
    if not out and not allow_empty:
        raise ConfigError(f"{_pre(where)}{name} is empty: name at least one")
    if len(set(map(str, out))) != len(out):
        raise ConfigError(f"{_pre(where)}{name} names an entry twice: {out}")
    return out


def check_int_list(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
                   where: str = "", allow_empty: bool = False) -> list[int]:
    """An int or a sequence of ints (``layers=[1, 2]``); strings such as ``"2"`` are refused, not iterated."""
    if _is_int(value):
        items = [value]
    elif isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise ArgumentTypeError(
            f"{_pre(where)}{name} must be an integer or a list of integers, got {_show(value)} ({type(value).__name__})"
        )
    else:
        items = list(value)
    out = [check_int(v, f"{name} entry", minimum=minimum, maximum=maximum, where=where) for v in items]
    if not out and not allow_empty:
        raise ConfigError(f"{_pre(where)}{name} is empty: give at least one")
    return out


def check_out_path(path: Any, name: str = "path", *, where: str = "") -> Path:
    """A path to write to: not empty, not None, a str or PathLike."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"{_pre(where)}{name} must be a path (str or pathlib.Path), got {_show(path)} ({type(path).__name__})")
    if str(path).strip() == "":
        raise ConfigError(f"{_pre(where)}{name} is empty: give a file or folder name")
    return Path(path).expanduser()


def check_writable_parent(path: Path, name: str = "path", *, where: str = "") -> Path:
    """Refuse a path that cannot be created: an ancestor that is a file, or a folder not writable."""
    p = Path(path).absolute()
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{_pre(where)}{name} {str(path)!r} cannot be written (nor created): {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK):
        raise ConfigError(f"{_pre(where)}{name} {str(path)!r} cannot be written (nor created): {anc} is not writable")
    return p


# --------------------------------------------------------------------------- memory
def _parse_bytes(s: str) -> int:
    s = s.strip().upper().replace(" ", "")
    for unit, mult in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))


def memory_budget() -> int:
    """Bytes tvlens lets one piece of work take: ``$TVLENS_MEMORY_LIMIT`` (e.g. ``"8GB"``) when set, else
    80% of the memory available now (``MemAvailable``; or ``psutil``), else no limit (a huge number)."""
    env = os.environ.get("TVLENS_MEMORY_LIMIT")
    if env:
        try:
            return _parse_bytes(env)
        except ValueError as e:
            raise ConfigError(f"TVLENS_MEMORY_LIMIT must be a size such as '8GB' or a number of bytes, got {env!r}") from e
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.8)
    except OSError:
        pass
    try:  # pragma: no cover - non-Linux
        import psutil

        return int(psutil.virtual_memory().available * 0.8)
    except Exception:  # pragma: no cover
        return 1 << 62


def fmt_bytes(n: float) -> str:
    for unit, mult in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{int(n)} B"


def check_memory(needed: float, what: str, lower: str, *, where: str = "") -> None:
    """Refuse, before allocating, work whose estimated peak memory ``needed`` (bytes) exceeds the budget.
    ``lower`` says which arguments to lower (e.g. ``"shots or batch_size"``)."""
    budget = memory_budget()
    if needed > budget:
        raise ResourceError(
            f"{_pre(where)}{what} needs about {fmt_bytes(needed)} of memory, more than the {fmt_bytes(budget)} "
            f"available to it (80% of free memory, or $TVLENS_MEMORY_LIMIT); lower {lower}"
        )


def transformer_batch_bytes(
    batch: int, seq: int, *, n_layers: int, d_model: int, n_heads: int, d_mlp: int, d_vocab_out: int,
    backward: bool = False, bytes_per_float: int = 4,
) -> float:
    """Estimated peak bytes of one forward (and backward) pass of a TransformerLens transformer: the
    activations autograd keeps per layer (residual-sized tensors, MLP hidden, attention scores and
    pattern), and the logits. Calibrated on TransformerLens 3.x HookedTransformer on CPU."""
    per_token = n_layers * (12 * d_model + 3 * d_mlp) + 3 * d_vocab_out
    attn = n_layers * n_heads * seq * seq * 4  # scores, masked scores, pattern, softmax grad/copies
    total = batch * (seq * per_token + attn) * bytes_per_float
    return total * (1.2 if backward else 1.0)  # measured: 1.53 GB for codes, 66 prompts of 278 tokens (est. 2.1)



# --------------------------------------------------------------------------- lists of integers (tvlens.validate)
def _plain_int(x: Any) -> bool:
    """A Python or numpy integer (not a bool, not a tensor)."""
    import numpy as np

    return not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, np.integer))


def _given(x: Any) -> str:
    import numpy as np
    import torch

    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"a {x.dtype} array of shape {x.shape}"
    r = repr(x)
    return f"{type(x).__name__} {r[:80] + '...' if len(r) > 80 else r}"


def as_items(value: Any, argument: str, expected: str, where: str = "") -> list[Any]:
    """``value`` (a sequence, a tensor or an array) as a non-empty list; anything else is refused as not
    ``expected``."""
    import numpy as np
    import torch

    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        value = value.tolist()
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"{_pre(where)}{argument} must be {expected}, got {_given(value)}") from None
    if not items:
        raise ConfigError(f"{_pre(where)}{argument} is empty: name at least one")
    return items


def int_list(value: Any, argument: str, lo: int, hi: int, where: str = "", what: str = "") -> list[int] | None:
    """A list of integers in ``lo..hi`` from an int, a sequence of ints, or None (returned as None).
    ``layers="2"`` is refused (a string is not a layer), as are floats, bools and out-of-range values."""
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError(f"{_pre(where)}{argument} must be an integer or a list of integers in {lo}..{hi}{what}, "
                          f"got the string {value!r}: give integers, e.g. {argument}=[2]")
    items = as_items([value] if _plain_int(value) else value, argument, "an integer or a list of integers", where)
    bad = [x for x in items if not _plain_int(x) or not lo <= int(x) <= hi]
    if bad:
        raise ConfigError(f"{_pre(where)}{argument} {bad} out of range or not integers: {argument} must be integers "
                          f"in {lo}..{hi}{what}")
    return [int(x) for x in items]


__all__ = [
    "int_list",
    "MAX_SEED",
    "check_batch_size",
    "check_choice",
    "check_float",
    "check_int",
    "check_int_list",
    "check_memory",
    "check_names",
    "check_optional_int",
    "check_out_path",
    "check_seed",
    "check_writable_parent",
    "fmt_bytes",
    "memory_budget",
    "transformer_batch_bytes",
]
