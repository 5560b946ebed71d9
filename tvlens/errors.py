"""tvlens exceptions: every error names the bad argument, what was expected and what was given."""

from __future__ import annotations


class TvlensError(Exception):
    """Base class of every error tvlens raises on purpose."""


class ConfigError(TvlensError, ValueError):
    """An argument or parameter that cannot work (impossible family parameters, bad shapes...)."""


class ArgumentTypeError(ConfigError, TypeError):
    """An argument of the wrong type (a string seed, a float step count, a string where a list is meant)."""


class UnknownNameError(TvlensError, KeyError):
    """An unknown task family, task or model name. The message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CheckpointError(TvlensError, ValueError):
    """A checkpoint that is missing, incomplete or whose sidecar does not match its weights."""


class OfflineWeightsError(TvlensError, FileNotFoundError):
    """Pretrained weights requested while offline and not on disk."""


class ResourceError(TvlensError, MemoryError):
    """Work that would need more memory than is available; the message says what to lower."""


class OverwriteError(TvlensError, FileExistsError):
    """A path that already holds something tvlens did not write in this run; the message names the flag
    (``overwrite=True``, ``--restart``) that allows replacing tvlens' own files there."""


class TrainingError(TvlensError, RuntimeError):
    """Training that cannot go on (a non-finite loss); nothing of that step is saved."""


class UnsupportedModelError(ConfigError, TypeError):
    """A model object tvlens cannot drive, or an architecture TransformerLens' bridge does not support."""


class HookError(TvlensError, KeyError):
    """A hook the model's backend cannot fire. The message names the hook and the backend."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CacheError(TvlensError, OSError):
    """A cache folder tvlens cannot use: one it did not write (never deleted), or one it cannot write to.
    The message names the folder and how to choose another (``cache_dir=``, ``$TVLENS_CACHE``)."""
