"""``lookup``: each input is a small key-value table; task T answers with the value of key T.

An input lists K (key, letter) pairs in random key order, e.g. ``% q # x & b @ m`` ; the task ``#``
answers ``x``. Every task answers from the same letter set, so no answer token reveals the task: a
model must see which key each example's answer follows to infer the task. The query's letters never
appear in its own context (no copying from an example), and inputs are high-entropy (letters drawn
fresh each time), so prompts never repeat.
"""

from __future__ import annotations

import string

from tvlens.errors import ConfigError
from tvlens.tasks.base import ARROW, END, TokenTaskFamily, check_int

KEYS = ["#", "$", "%", "&", "@", "*", "+", "="]


class Lookup(TokenTaskFamily):
    name = "lookup"

    def __init__(self, n_keys: int = 6, n_letters: int = 26) -> None:
        K = check_int("n_keys", n_keys, 2, self.name)
        p = check_int("n_letters", n_letters, 2, self.name)
        if K > len(KEYS):
            raise ConfigError(f"lookup: n_keys must be <= {len(KEYS)}, got {K}")
        if p > 52 or p < 2 * K:
            raise ConfigError(f"lookup: n_letters must be in [2 * n_keys, 52] = [{2 * K}, 52], got {p}")
        super().__init__(n_keys=K, n_letters=p)
        self.K, self.p = K, p
        self.keys = KEYS[:K]
        self.letters = list((string.ascii_lowercase + string.ascii_uppercase)[:p])

    @property
    def task_names(self) -> list[str]:
        return [f"key{k}" for k in self.keys]

    @property
    def vocab(self) -> list[str]:
        return self.letters + self.keys + [ARROW, END]

    def _draw(self, task, shots, rng):
        K, p = self.K, self.p

        def table(pool):
            vals = rng.choice(pool, size=K, replace=False).tolist()
            order = rng.permutation(K)
            inp = []
            for k in order:
                inp += [p + int(k), vals[k]]
            return inp, vals

        q_in, q_vals = table(list(range(p)))
        rest = [x for x in range(p) if x not in set(q_vals)]
        examples = []
        for _ in range(shots):
            inp, vals = table(rest)
            examples.append((inp, [vals[task]]))
        return examples, q_in, [[v] for v in q_vals]
