"""``categories``: a synthetic analogue of the paper's "first word with POS tag T" tasks.

Content tokens fall in C categories of M tokens. Each input holds one token of every category in
random order; task t answers with the input's token of category t; Null answers with a random token
of the input. Example: ``dog red three -> red ;`` for the task ``color``.
"""

from __future__ import annotations

from tvlens.tasks.base import ARROW, END, TokenTaskFamily, check_int

WORDS = {
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown",
              "black", "white", "gray", "violet", "cyan", "teal", "gold", "silver"],
    "animal": ["cat", "dog", "horse", "mouse", "lion", "tiger", "bear", "wolf",
               "fox", "deer", "goat", "sheep", "rabbit", "camel", "zebra", "monkey"],
    "fruit": ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "melon",
              "cherry", "banana", "kiwi", "lime", "fig", "date", "papaya", "guava"],
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen"],
    "country": ["France", "Spain", "Italy", "Japan", "Chile", "Peru", "Kenya", "Egypt",
                "Brazil", "India", "China", "Mexico", "Canada", "Norway", "Greece", "Turkey"],
    "verb": ["run", "jump", "swim", "sing", "read", "write", "cook", "walk",
             "dance", "sleep", "climb", "draw", "paint", "fly", "throw", "catch"],
}


class Categories(TokenTaskFamily):
    name = "categories"

    def __init__(self, n_categories: int = 6, tokens_per_category: int = 8, null: bool = True) -> None:
        n_categories = check_int("n_categories", n_categories, 2, self.name)
        tokens_per_category = check_int("tokens_per_category", tokens_per_category, 2, self.name)
        super().__init__(n_categories=n_categories, tokens_per_category=tokens_per_category, null=bool(null))
        self.C, self.M, self.null = n_categories, tokens_per_category, bool(null)
        if self.C <= len(WORDS) and self.M <= 16:
            self.categories = list(WORDS)[: self.C]
            self.words = [WORDS[c][: self.M] for c in self.categories]
        else:
            self.categories = [f"cat{c}" for c in range(self.C)]
            self.words = [[f"c{c}w{m}" for m in range(self.M)] for c in range(self.C)]
        self._content = [w for ws in self.words for w in ws]

    @property
    def task_names(self) -> list[str]:
        return list(self.categories) + (["null"] if self.null else [])

    @property
    def vocab(self) -> list[str]:
        return self._content + [ARROW, END]

    def _draw(self, task, shots, rng):
        def one() -> tuple[list[int], list[list[int]]]:
            picks = rng.integers(0, self.M, size=self.C)  # one token of every category
            toks = [c * self.M + int(picks[c]) for c in range(self.C)]
            answers = [[t] for t in toks]
            order = rng.permutation(self.C)
            inp = [toks[i] for i in order]
            if self.null:
                answers.append([inp[int(rng.integers(0, self.C))]])
            return inp, answers

        examples = []
        for _ in range(shots):
            inp, answers = one()
            examples.append((inp, answers[task]))
        q_in, q_answers = one()
        return examples, q_in, q_answers
