"""``shift``: the default family, designed so that the task is visible only in how inputs map to outputs.

Tokens are the p letters ``a, b, c, ...``. Task k maps a letter x to the letter (x + offset_k) mod p
(a Caesar shift). Example with offset 3: ``c -> f ; k -> n ; x -> a``. Why this family:

- every task answers from the same letter set, so no answer token reveals the task; a model must
  compare each example's output with its input to know the task;
- the query's letter never appears in its own context (neither as an example input nor output), so
  the answer can't be copied from an example: the model has to apply the inferred shift;
- one example identifies the task (offsets are distinct), so a model that encodes the task can
  be near perfect from one shot.
"""

from __future__ import annotations

import string

from tvlens.errors import ConfigError
from tvlens.tasks.base import ARROW, END, TokenTaskFamily, check_int

DEFAULT_OFFSETS = (1, 3, 6, 10, 15, 21)


class Shift(TokenTaskFamily):
    name = "shift"

    def __init__(self, n_letters: int = 26, offsets: tuple[int, ...] = DEFAULT_OFFSETS, marked_query: bool = False) -> None:
        n_letters = check_int("n_letters", n_letters, 3, self.name)
        if n_letters > 26 * 2:
            raise ConfigError(f"shift: n_letters must be <= 52 (a-z, A-Z), got {n_letters}")
        offsets = tuple(int(o) for o in offsets)
        if len(offsets) < 1:
            raise ConfigError("shift: offsets must name at least one shift")
        residues = [o % n_letters for o in offsets]
        if 0 in residues or len(set(residues)) != len(residues):
            raise ConfigError(
                f"shift: offsets must be distinct and nonzero modulo n_letters={n_letters}, got {list(offsets)}"
            )
        if not isinstance(marked_query, bool):
            raise ConfigError(f"shift: marked_query must be True or False, got {marked_query!r}")
        super().__init__(n_letters=n_letters, offsets=list(offsets), marked_query=marked_query)
        self.p, self.offsets = n_letters, offsets
        self.letters = list((string.ascii_lowercase + string.ascii_uppercase)[:n_letters])
        self.query_arrow = not marked_query

    @property
    def task_names(self) -> list[str]:
        return [f"shift+{o}" for o in self.offsets]

    @property
    def vocab(self) -> list[str]:
        marked = [f"{x}?" for x in self.letters] if not self.query_arrow else []
        return self.letters + [ARROW, END] + marked

    def max_shots(self) -> int:
        # example inputs avoid the query letter x_q and x_q - k (whose output would be x_q)
        return self.p - 2

    def _draw(self, task, shots, rng):
        p, k = self.p, self.offsets[task]
        xq = int(rng.integers(0, p))
        allowed = [x for x in range(p) if x != xq and (x + k) % p != xq]
        xs = rng.choice(allowed, size=shots, replace=False).tolist() if shots else []
        examples = [([x], [(x + k) % p]) for x in xs]
        q_in = [xq] if self.query_arrow else [p + 2 + xq]  # the marked token ``x?`` replaces ``x ->``
        return examples, q_in, [[(xq + o) % p] for o in self.offsets]
