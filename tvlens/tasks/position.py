"""``position``: the default family, designed so that the task shows only in how inputs map to outputs.

Each input is a word of L distinct random letters; task t answers with the input's letter at
position t (``pos1`` .. ``posL``). Example for ``pos3``: ``q f k w b -> k ;``. Why this family:

- every task answers from the same letter set, so no answer token reveals the task: a model must
  find where each example's answer sits in its input to know the task;
- the query's letters never appear in its own context, so nothing can be copied from an example:
  the model has to apply the inferred position to the query;
- inputs are high-entropy (26*25*24*23*22 words for L=5), so prompts never repeat: an untrained
  network's representation can't group prompts of one task by memorised contexts (unlike ``shift``,
  whose 26 x 6 (query, task) pairs recur), and a task representation is what groups them.
"""

from __future__ import annotations

import string

from tvlens.errors import ConfigError
from tvlens.tasks.base import ARROW, END, TokenTaskFamily, check_int


class Position(TokenTaskFamily):
    name = "position"

    def __init__(self, n_letters: int = 26, length: int = 5) -> None:
        n_letters = check_int("n_letters", n_letters, 2, self.name)
        length = check_int("length", length, 2, self.name)
        if n_letters > 52:
            raise ConfigError(f"position: n_letters must be <= 52 (a-z, A-Z), got {n_letters}")
        if 2 * length > n_letters:
            raise ConfigError(
                f"position: n_letters={n_letters} is too few for words of length={length}: the context "
                f"needs `length` letters besides the query's (n_letters >= 2 * length)"
            )
        super().__init__(n_letters=n_letters, length=length)
        self.p, self.L = n_letters, length
        self.letters = list((string.ascii_lowercase + string.ascii_uppercase)[:n_letters])

    @property
    def task_names(self) -> list[str]:
        return [f"pos{t + 1}" for t in range(self.L)]

    @property
    def vocab(self) -> list[str]:
        return self.letters + [ARROW, END]

    def _draw(self, task, shots, rng):
        q_in = rng.choice(self.p, size=self.L, replace=False).tolist()
        rest = [x for x in range(self.p) if x not in set(q_in)]
        examples = []
        for _ in range(shots):
            inp = rng.choice(rest, size=self.L, replace=False).tolist()
            examples.append((inp, [inp[task]]))
        return examples, q_in, [[q_in[t]] for t in range(self.L)]
