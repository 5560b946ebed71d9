"""``bitwise``: AND, OR, XOR, NAND, NOR, XNOR of two n-bit strings (the paper's LLM bitwise tasks).

Each example is ``a1..an , b1..bn -> c1..cn ;`` with one token per bit; the answer is the n output
bits. The optional Null task answers with random bits.
"""

from __future__ import annotations

import numpy as np

from tvlens.errors import ConfigError
from tvlens.tasks.base import ARROW, END, TokenTaskFamily, check_int

OPS = {
    "and": lambda a, b: a & b,
    "or": lambda a, b: a | b,
    "xor": lambda a, b: a ^ b,
    "nand": lambda a, b: 1 - (a & b),
    "nor": lambda a, b: 1 - (a | b),
    "xnor": lambda a, b: 1 - (a ^ b),
}
COMMA = ","


class Bitwise(TokenTaskFamily):
    name = "bitwise"

    def __init__(self, n_bits: int = 5, null: bool = True, ops: tuple[str, ...] = tuple(OPS)) -> None:
        n_bits = check_int("n_bits", n_bits, 1, self.name)
        ops = tuple(ops)
        unknown = [o for o in ops if o not in OPS]
        if unknown or not ops:
            raise ConfigError(f"bitwise: unknown ops {unknown or ops}; known: {list(OPS)}")
        super().__init__(n_bits=n_bits, null=bool(null), ops=list(ops))
        self.n_bits, self.null, self.ops = n_bits, bool(null), ops

    @property
    def task_names(self) -> list[str]:
        return list(self.ops) + (["null"] if self.null else [])

    @property
    def vocab(self) -> list[str]:
        return ["0", "1", COMMA, ARROW, END]

    def max_shots(self) -> int:
        return 4 ** self.n_bits - 1  # distinct (a, b) pairs, the query's excluded

    def _draw(self, task, shots, rng):
        n = self.n_bits
        # distinct (a, b) input pairs: the query's pair never appears among the examples
        codes = rng.choice(4**n, size=shots + 1, replace=False) if 4**n <= 1 << 20 else None
        if codes is None:  # pragma: no cover - huge n_bits
            codes = rng.integers(0, 4**n, size=shots + 1)
        pairs = [((c >> n) & ((1 << n) - 1), c & ((1 << n) - 1)) for c in codes.tolist()]

        def bits(v: int) -> list[int]:
            return [(v >> (n - 1 - i)) & 1 for i in range(n)]

        def answers_for(a: int, b: int) -> list[list[int]]:
            ab, bb = np.array(bits(a)), np.array(bits(b))
            out = [OPS[o](ab, bb).tolist() for o in self.ops]
            if self.null:
                out.append(rng.integers(0, 2, size=n).tolist())
            return out

        comma = 2
        examples = []
        for a, b in pairs[:-1]:
            ans = answers_for(a, b)[task]
            examples.append((bits(a) + [comma] + bits(b), ans))
        a, b = pairs[-1]
        return examples, bits(a) + [comma] + bits(b), answers_for(a, b)
