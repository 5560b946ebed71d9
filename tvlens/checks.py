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


# --------------------------------------------------------------------------- sizes: one work/memory estimate
def _parse_number(s: str) -> float:
    s = s.strip().lower()
    if s in ("inf", "none", "off", "unlimited"):
        return math.inf
    return float(s)


def work_budget() -> float:
    """Floating-point operations tvlens lets one call take before refusing it: ``$TVLENS_WORK_LIMIT``
    (e.g. ``"1e14"``, or ``"inf"`` for no limit) when set, else 3e13 (about 10 minutes at the 50 GFLOP/s
    a few CPU cores reach; a GPU does it in seconds, so raise the limit there)."""
    env = os.environ.get("TVLENS_WORK_LIMIT")
    if env:
        try:
            return _parse_number(env)
        except ValueError as e:
            raise ConfigError(f"TVLENS_WORK_LIMIT must be a number of operations such as '1e14' or 'inf', got {env!r}") from e
    return 3e13


def check_work(flops: float, what: str, lower: str, *, where: str = "") -> None:
    """Refuse, before starting, work whose estimated operation count ``flops`` exceeds ``work_budget()``."""
    budget = work_budget()
    if flops > budget:
        raise ResourceError(
            f"{_pre(where)}{what} needs about {flops:.1e} operations, more than the {budget:.0e} one call may take "
            f"(minutes to hours on a CPU; set $TVLENS_WORK_LIMIT to allow it); lower {lower}"
        )


def check_size(
    value: Any,
    name: str,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    where: str = "",
    bytes_each: float = 0.0,
    flops_each: float = 0.0,
    bytes_base: float = 0.0,
    flops_base: float = 0.0,
    what: str = "",
    hint: str = "",
) -> int:
    """A size (a count of steps, resamples, prompts, layers...): an integer (numpy integers welcome, bools
    refused) ``>= minimum``, whose cost is checked before any work with the ONE estimate every function
    shares: ``bytes_base + value * bytes_each`` against ``memory_budget()`` and ``flops_base + value *
    flops_each`` against ``work_budget()``; the error names ``name`` as the argument to lower."""
    v = check_int(value, name, minimum=minimum, maximum=maximum, where=where, hint=hint)
    label = what or f"{name}={v}"
    if bytes_each or bytes_base:
        check_memory(bytes_base + v * bytes_each, label, name, where=where)
    if flops_each or flops_base:
        check_work(flops_base + v * flops_each, label, name, where=where)
    return v


def forward_flops(n_tokens: float, *, n_layers: int, d_model: int, d_mlp: int | None = None, d_vocab_out: int = 0,
                  seq: int = 1, backward: bool = False) -> float:
    """Estimated operations of one forward (x3 with the backward) pass over ``n_tokens`` tokens of a
    transformer: attention and MLP matmuls, attention scores, the unembedding."""
    d_mlp = 4 * d_model if d_mlp is None else d_mlp
    per_token = n_layers * (2 * 4 * d_model * d_model + 2 * 2 * d_model * d_mlp + 2 * 2 * seq * d_model)
    per_token += 2 * d_model * d_vocab_out
    return float(n_tokens) * per_token * (3 if backward else 1)


def model_bytes(*, n_layers: int, d_model: int, d_mlp: int | None = None, d_vocab: int = 0, n_ctx: int = 0,
                bytes_per_float: int = 4) -> float:
    """Bytes of a transformer's weights (attention 4 d_model^2 and MLP 2 d_model d_mlp per layer, embeddings):
    the same estimate for building, loading and training (which adds gradients and Adam's two moments)."""
    d_mlp = 4 * d_model if d_mlp is None else d_mlp
    n = n_layers * (4 * d_model * d_model + 2 * d_model * d_mlp) + (2 * d_vocab + n_ctx) * d_model
    return float(n) * bytes_per_float


def check_probability(value: Any, name: str, *, where: str = "", open_low: bool = True, open_high: bool = True,
                      what: str = "a probability") -> float:
    """A number in (0, 1) (ends closed when ``open_low``/``open_high`` are False): confidence levels
    (``level=0.95``), quantiles, fractions. Refuses bools, strings, NaN and 1.5 naming the argument."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0)):
        raise ArgumentTypeError(f"{_pre(where)}{name} must be {what} (a number between 0 and 1), got {_show(value)} "
                                f"({type(value).__name__})")
    v = float(value.item() if hasattr(value, "item") else value)
    lo_ok = v > 0 if open_low else v >= 0
    hi_ok = v < 1 if open_high else v <= 1
    if not (math.isfinite(v) and lo_ok and hi_ok):
        rng = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise ConfigError(f"{_pre(where)}{name} must be {what} in {rng}, e.g. 0.95, got {v}")
    return v


# --------------------------------------------------------------------------- devices
def check_device(device: Any, name: str = "device", *, where: str = "", allow_none: bool = False):
    """A device tvlens can run on here: ``"cpu"``, ``"cuda"``/``"cuda:N"`` when CUDA has that GPU, ``"mps"``
    when available, or a ``torch.device``. ``"meta"`` is refused (it holds no weights: nothing can be
    computed), as are unknown names (``"banana"``). Returns a ``torch.device`` (or None when allowed)."""
    import torch

    if device is None and allow_none:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise ArgumentTypeError(f"{_pre(where)}{name} must be a device name such as 'cpu' or 'cuda', or a torch.device, "
                                f"got {_show(device)} ({type(device).__name__})")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{_pre(where)}{name}={_show(device)} is not a device; use 'cpu', 'cuda', 'cuda:0' or 'mps'") from None
    if dev.type == "meta":
        raise ConfigError(f"{_pre(where)}{name}='meta' holds shapes without weights, so nothing can be computed on it; "
                          "use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{_pre(where)}{name}={_show(device)}: this machine (this torch build) has no CUDA GPU; "
                              "use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{_pre(where)}{name}={_show(device)}: there are {torch.cuda.device_count()} CUDA GPU(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{_pre(where)}{name}='mps': this machine has no Apple GPU available; use 'cpu'")
    elif dev.type != "cpu":
        raise ConfigError(f"{_pre(where)}{name}={_show(device)}: tvlens runs on 'cpu', 'cuda' or 'mps'")
    return dev


# --------------------------------------------------------------------------- keyword arguments
def check_kwargs(kwargs: dict, known: Iterable[str], *, where: str = "", hint: str = "") -> None:
    """Refuse keyword arguments a function does not use (a typo such as ``devcie=`` would be ignored)."""
    known = list(known)
    bad = [k for k in kwargs if k not in known]
    if bad:
        import difflib

        k = bad[0]
        close = difflib.get_close_matches(k, known, n=1)
        raise ArgumentTypeError(
            f"{_pre(where)}unknown keyword argument {k!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + (f"; it takes {sorted(known)}" if known else "")
            + (f"; {hint}" if hint else "")
        )


def check_call(fn: Any, args: tuple, kwargs: dict, *, where: str = "") -> None:
    """Refuse a call ``fn(*args, **kwargs)`` cannot take (an unknown or repeated keyword, a missing argument)
    with a tvlens error naming the argument (a wrapper's ``*args, **kwargs`` would otherwise surface Python's
    bare TypeError from inside tvlens)."""
    import inspect

    sig = inspect.signature(fn)
    known = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        check_kwargs(kwargs, known, where=where)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ArgumentTypeError(f"{_pre(where)}{e}") from None


def check_unused(name: str, value: Any, default: Any, *, where: str = "", because: str = "") -> None:
    """Refuse an argument given a value although it does nothing in this call (``ig_steps`` with a
    method that does not integrate): a silent no-op would let a user believe it took effect."""
    if value is default or (value is not None and default is not None and _same(value, default)):
        return
    raise ConfigError(f"{_pre(where)}{name}={_show(value)} has no effect here{': ' + because if because else ''}; "
                      f"leave {name} out")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


# --------------------------------------------------------------------------- files to write
def check_new_file(path: Any, name: str = "path", *, overwrite: bool = False, where: str = "",
                   suffix: str | None = None) -> Path:
    """A file to write: a str or PathLike, not empty, not an existing folder, not a symlink loop, in a folder
    that can be created; an existing file is refused unless ``overwrite=True`` (``OverwriteError``).
    ``suffix`` (e.g. ``".html"``) is added when the name has none."""
    from tvlens.errors import OverwriteError

    p = check_out_path(path, name, where=where)
    if p.is_dir():
        raise ConfigError(f"{_pre(where)}{name} {str(p)!r} is an existing folder; give a file name inside it, "
                          f"e.g. {str(p / ('page' + (suffix or '.html')))!r}")
    if suffix and not p.suffix and p.name not in ("", ".", ".."):
        p = p.with_suffix(suffix)
    if p.name in ("", ".", ".."):
        raise ConfigError(f"{_pre(where)}{name} {str(path)!r} has no file name; give e.g. 'out/page.html'")
    if p.is_symlink():
        try:
            p.resolve(strict=True)
        except RuntimeError:
            raise ConfigError(f"{_pre(where)}{name} {str(p)!r} is a symbolic link loop; remove it or choose another name") from None
        except OSError:
            pass  # a dangling link: writing replaces the link
    if p.is_dir():
        raise ConfigError(f"{_pre(where)}{name} {str(p)!r} is an existing folder; give a file name inside it, "
                          f"e.g. {str(p / ('page' + (suffix or '.html')))!r}")
    check_writable_parent(p, name, where=where)
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise OverwriteError(f"{_pre(where)}{name} {str(p)!r} already exists; tvlens does not overwrite files: choose "
                             "another path, or pass overwrite=True to replace it")
    return p


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync'ed, then ``os.replace``:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


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
    "atomic_write",
    "check_device",
    "check_kwargs",
    "check_new_file",
    "check_probability",
    "check_size",
    "check_unused",
    "check_work",
    "forward_flops",
    "model_bytes",
    "work_budget",
    "check_batch_size",
    "check_call",
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
