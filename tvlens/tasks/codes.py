"""``codes``: the default family, designed so that the task shows only in how inputs map to outputs.

Content words fall in C categories; every word has a code in ``1..K`` (``red``=1, ``blue``=2, ...,
``black``=1, ...: each code has ``words_per_code`` words in every category). Each input holds one
word of every category, in random order, with C distinct codes; task T answers with the *code* of
the input's category-T word. Example for ``color``: ``dog red three France apple run -> 1 ;``.

Why this family:

- every task answers from the same code set, so no answer token reveals the task: a model must find
  which input word carries each example's code to infer the task (one example suffices, codes within
  an input being distinct);
- in every prompt ``sample()`` draws (evaluation and every analysis), the query's words never
  appear in its own context, so no answer can be copied from an example. With one word per code
  (the default), that also means no example answers with the query's code, a shortcut ("answer a
  code that no example answered") a model could learn without the task; so training prompts
  (``sample_train``) do not exclude the query's words, and a model trained on them cannot have
  learned that shortcut. With ``words_per_code >= 2`` an example can share the query's code through
  another word and the shortcut does not exist;
- inputs are high-entropy, so prompts never repeat: an untrained network cannot group prompts of one
  task by recurring contexts (``shift``'s 26 x 6 (query, task) pairs recur), only a task
  representation groups them.

Training curriculum (``reveal``): ``sample_train`` lets an example answer with the category word
itself with probability ``reveal``, which makes the task visible early in training (without it a
4-layer model sat at chance for 3000+ steps here); ``sample`` never does.
"""

from __future__ import annotations

from tvlens.errors import ConfigError
from tvlens.tasks.base import ARROW, END, TokenTaskFamily, check_int
from tvlens.tasks.categories import WORDS


class Codes(TokenTaskFamily):
    name = "codes"

    def __init__(self, n_categories: int = 6, n_codes: int = 8, words_per_code: int = 1,
                 reveal: float = 0.0) -> None:
        C = check_int("n_categories", n_categories, 2, self.name)
        K = check_int("n_codes", n_codes, 2, self.name)
        W = check_int("words_per_code", words_per_code, 1, self.name)
        if K < C:
            raise ConfigError(f"codes: n_codes={K} must be >= n_categories={C} (an input's C codes are distinct)")
        if not 0.0 <= reveal <= 1.0:
            raise ConfigError(f"codes: reveal must be a probability in [0, 1], got {reveal}")
        super().__init__(n_categories=C, n_codes=K, words_per_code=W, reveal=float(reveal))
        self.C, self.K, self.W, self.reveal = C, K, W, float(reveal)
        self.M = K * W  # words per category; word m of a category has code m % K
        if C <= len(WORDS) and self.M <= 16:
            self.categories = list(WORDS)[:C]
            self.words = [WORDS[c][: self.M] for c in self.categories]
        else:
            self.categories = [f"cat{c}" for c in range(C)]
            self.words = [[f"c{c}w{m}" for m in range(self.M)] for c in range(C)]
        self.codes = [str(k + 1) for k in range(K)]
        self._training = False

    @property
    def task_names(self) -> list[str]:
        return list(self.categories)

    @property
    def vocab(self) -> list[str]:
        return [w for ws in self.words for w in ws] + self.codes + [ARROW, END]

    def code_of(self, word: str) -> int:
        """The code (1..K) of a content word."""
        for ws in self.words:
            if word in ws:
                return ws.index(word) % self.K + 1
        raise ConfigError(f"{word!r} is not a word of this family")

    def code_token(self, k: int) -> int:
        return self.C * self.M + k

    def sample_train(self, n_per_task: int, shots: int = 4, seed: int = 0):
        """Training prompts: with probability ``reveal`` an example answers with the category word
        itself instead of its code (a curriculum). ``sample()`` never reveals."""
        self._training = True
        try:
            return self.sample(n_per_task, shots=shots, seed=seed)
        finally:
            self._training = False

    def _draw(self, task, shots, rng):
        C, K, W, M = self.C, self.K, self.W, self.M

        def draw_input(exclude: list[int] | None):
            codes = rng.choice(K, size=C, replace=False)  # distinct codes within an input
            words = []
            for c in range(C):
                choices = [codes[c] + K * w for w in range(W)]  # the words with this code
                if exclude is not None:
                    choices = [m for m in choices if m != exclude[c]] or choices
                words.append(int(choices[int(rng.integers(0, len(choices)))]))
            return codes, words

        q_codes, q_words = draw_input(None)
        q_order = rng.permutation(C)
        q_in = [c * M + q_words[c] for c in q_order]
        examples = []
        for _ in range(shots):
            if self._training:
                codes, words = draw_input(None)
            else:
                while True:  # none of the query's words in the context (no copying)
                    codes, words = draw_input(q_words)
                    if all(words[c] != q_words[c] for c in range(C)):
                        break
            order = rng.permutation(C)
            inp = [c * M + words[c] for c in order]
            if self._training and rng.random() < self.reveal:
                examples.append((inp, [task * M + words[task]]))
            else:
                examples.append((inp, [self.code_token(int(codes[task]))]))
        return examples, q_in, [[self.code_token(int(q_codes[t]))] for t in range(C)]
