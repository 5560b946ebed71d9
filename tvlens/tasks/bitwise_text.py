"""``bitwise_text``: the paper's bitwise tasks as text, for tokenizer-based language models.

Tasks ``and``, ``nand``, ``or``, ``nor``, ``xor``, ``xnor`` of two ``n_bits``-digit binary numbers,
plus ``null`` (a random ``n_bits``-digit answer). Example (``xor``, default template)::

    01101 11010 -> 10111
"""

from __future__ import annotations

import numpy as np

from tvlens.errors import ConfigError
from tvlens.tasks.base import check_int
from tvlens.tasks.text import DEFAULT_TEMPLATE, TextPrompt, TextTaskFamily, WordTokenizer, draw_distinct

OPS = {
    "and": lambda a, b: a & b,
    "nand": lambda a, b: ~(a & b),
    "or": lambda a, b: a | b,
    "nor": lambda a, b: ~(a | b),
    "xor": lambda a, b: a ^ b,
    "xnor": lambda a, b: ~(a ^ b),
}


class BitwiseText(TextTaskFamily):
    name = "bitwise_text"

    def __init__(self, template: str = DEFAULT_TEMPLATE, n_bits: int = 5, null: bool = True,
                 ops: tuple[str, ...] = tuple(OPS), separator: str = " ") -> None:
        n_bits = check_int("n_bits", n_bits, 1, self.name)
        if n_bits > 10:
            raise ConfigError(f"bitwise_text: n_bits must be <= 10 (a pool of 4**n_bits pairs), got {n_bits}")
        ops = tuple(ops)
        unknown = [o for o in ops if o not in OPS]
        if unknown or not ops:
            raise ConfigError(f"bitwise_text: unknown ops {unknown or ops}; known: {list(OPS)}")
        if not isinstance(separator, str) or not separator or any(c in "01" for c in separator):
            raise ConfigError(f"bitwise_text: separator must be a non-empty string without 0/1, got {separator!r}")
        super().__init__(template=template, n_bits=n_bits, null=bool(null), ops=list(ops), separator=separator)
        self.n_bits, self.null, self.ops, self.separator = n_bits, bool(null), ops, separator

    @property
    def task_names(self) -> list[str]:
        return list(self.ops) + (["null"] if self.null else [])

    def pool_size(self) -> int:
        return 4 ** self.n_bits

    def words(self) -> list[str]:
        return [self.bits(v) for v in range(1 << self.n_bits)] + WordTokenizer.pieces(self.separator)

    def max_input_tokens(self) -> int:
        return len(WordTokenizer.pieces(f"{self.bits(0)}{self.separator}{self.bits(0)}"))

    def bits(self, v: int) -> str:
        return format(v & ((1 << self.n_bits) - 1), f"0{self.n_bits}b")

    def _answers(self, a: int, b: int, rng: np.random.Generator) -> list[str]:
        out = [self.bits(OPS[o](a, b)) for o in self.ops]
        if self.null:
            out.append(self.bits(int(rng.integers(1 << self.n_bits))))
        return out

    def _draw_text(self, task: int, shots: int, rng: np.random.Generator) -> TextPrompt:
        n = self.n_bits
        pairs = [(c >> n, c & ((1 << n) - 1)) for c in draw_distinct(rng, 4**n, shots + 1)]
        examples = [(f"{self.bits(a)}{self.separator}{self.bits(b)}", self._answers(a, b, rng)[task])
                    for a, b in pairs[:-1]]
        a, b = pairs[-1]
        answers = self._answers(a, b, rng)
        return TextPrompt(examples=examples, query=f"{self.bits(a)}{self.separator}{self.bits(b)}",
                          answer=answers[task], task=task, task_answers=answers)
