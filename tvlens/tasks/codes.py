"""``codes``: the default family, designed so that the task shows only in how inputs map to outputs.

Content words fall in C categories of M words, and every word has a code: its index in its
category (``red``=1, ``blue``=2, ...; ``cat``=1, ``dog``=2, ...). Each input holds one word of every
category, in random order, with C distinct codes; task T answers with the *code* of the input's
category-T word. Example for ``color``: ``dog red three France apple run -> 1 ;``. Why this family:

- every task answers from the same code set ``1..M``, so no answer token reveals the task: a model
  must find which input word carries each example's code to infer the task (one example suffices,
  codes within an input being distinct);
- the query's words never appear in its own context, so no answer can be copied from an example;
- inputs are high-entropy (M^C words in C! orders), so prompts never repeat: an untrained network
  cannot group prompts of one task by recurring contexts (the ``shift`` family's 26 x 6 (query,
  task) pairs do recur, and its TD picks them up), and only a task representation groups them.
"""

from __future__ import annotations

from tvlens.errors import ConfigError
from tvlens.tasks.base import ARROW, END, TokenTaskFamily, check_int
from tvlens.tasks.categories import WORDS


class Codes(TokenTaskFamily):
    name = "codes"

    def __init__(self, n_categories: int = 6, words_per_category: int = 8, reveal: float = 0.0) -> None:
        C = check_int("n_categories", n_categories, 2, self.name)
        M = check_int("words_per_category", words_per_category, 2, self.name)
        if M < C:
            raise ConfigError(
                f"codes: words_per_category={M} must be >= n_categories={C} (an input's C codes are distinct)"
            )
        if M < 2 * 1 + 1:
            raise ConfigError(f"codes: words_per_category must be >= 3, got {M}")
        if not 0.0 <= reveal <= 1.0:
            raise ConfigError(f"codes: reveal must be a probability in [0, 1], got {reveal}")
        super().__init__(n_categories=C, words_per_category=M, reveal=float(reveal))
        self.reveal = float(reveal)
        self._training = False
        self.C, self.M = C, M
        if C <= len(WORDS) and M <= 8:
            self.categories = list(WORDS)[:C]
            self.words = [WORDS[c][:M] for c in self.categories]
        else:
            self.categories = [f"cat{c}" for c in range(C)]
            self.words = [[f"c{c}w{m}" for m in range(M)] for c in range(C)]
        self.codes = [str(m + 1) for m in range(M)]

    @property
    def task_names(self) -> list[str]:
        return list(self.categories)

    @property
    def vocab(self) -> list[str]:
        return [w for ws in self.words for w in ws] + self.codes + [ARROW, END]

    def sample_train(self, n_per_task: int, shots: int = 4, seed: int = 0):
        """Training prompts: with probability ``reveal`` an example answers with the category word
        itself instead of its code (a curriculum that makes the task visible early in training).
        ``sample()`` (evaluation and analysis) never reveals."""
        self._training = True
        try:
            return self.sample(n_per_task, shots=shots, seed=seed)
        finally:
            self._training = False

    def code_token(self, m: int) -> int:
        return self.C * self.M + m

    def _draw(self, task, shots, rng):
        C, M = self.C, self.M

        def word(c: int, m: int) -> int:
            return c * M + m

        q_codes = rng.choice(M, size=C, replace=False)  # distinct codes within an input
        q_order = rng.permutation(C)
        q_in = [word(int(c), int(q_codes[c])) for c in q_order]
        examples = []
        for _ in range(shots):
            # distinct codes within an input, and none of the query's words (no copying)
            while True:
                codes = rng.choice(M, size=C, replace=False)
                if not (codes == q_codes).any():
                    break
            order = rng.permutation(C)
            inp = [word(int(c), int(codes[c])) for c in order]
            if self._training and rng.random() < self.reveal:  # curriculum: show the word itself
                examples.append((inp, [word(task, int(codes[task]))]))
            else:
                examples.append((inp, [self.code_token(int(codes[task]))]))
        return examples, q_in, [[self.code_token(int(q_codes[t]))] for t in range(C)]
