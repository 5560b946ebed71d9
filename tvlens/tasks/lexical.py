"""``lexical``: classic word-level ICL tasks in the style of Hendel et al. (2023) / Todd et al. (2024).

Tasks (each a small, hand-checked list of single-word pairs; every input has one answer):

- ``antonym``: ``hot -> cold``;
- ``country_capital``: ``France -> Paris`` (single-word capitals only);
- ``uppercase``: ``garden -> GARDEN``;
- ``next_letter``: ``a -> b`` (``a``..``y``);
- ``present_past``: ``go -> went``.

Each task reads its own kind of input, so another task's rule does not apply to a query:
``PromptSet.task_answers`` is ``None`` for this family (``run_patching`` needs it and says so).
``tasks=`` picks a subset. No Null task.
"""

from __future__ import annotations

import numpy as np

from tvlens.errors import ConfigError
from tvlens.tasks.text import DEFAULT_TEMPLATE, TextPrompt, TextTaskFamily, draw_distinct

ANTONYMS = (
    ("hot", "cold"), ("tall", "short"), ("open", "closed"), ("wet", "dry"), ("hard", "soft"), ("rich", "poor"),
    ("early", "late"), ("full", "empty"), ("strong", "weak"), ("high", "low"), ("thick", "thin"),
    ("loud", "quiet"), ("clean", "dirty"), ("heavy", "light"), ("win", "lose"), ("push", "pull"),
    ("love", "hate"), ("true", "false"), ("above", "below"), ("inside", "outside"), ("always", "never"),
    ("before", "after"), ("buy", "sell"), ("ancient", "modern"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("happy", "sad"), ("fast", "slow"), ("good", "bad"), ("left", "right"), ("first", "last"), ("wide", "narrow"),
)
COUNTRY_CAPITAL = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Cuba", "Havana"),
    ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Hungary", "Budapest"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("Vietnam", "Hanoi"), ("Switzerland", "Bern"), ("Pakistan", "Islamabad"),
)
UPPERCASE_WORDS = (
    "garden", "river", "apple", "window", "yellow", "music", "planet", "silver", "forest", "candle", "pencil",
    "winter", "rabbit", "orange", "castle", "bridge", "doctor", "market", "jacket", "island", "summer",
    "button", "ladder", "kitten", "valley", "rocket", "circle", "pepper", "basket", "tunnel",
)
PRESENT_PAST = (
    ("walk", "walked"), ("run", "ran"), ("go", "went"), ("eat", "ate"), ("see", "saw"), ("take", "took"),
    ("give", "gave"), ("write", "wrote"), ("sing", "sang"), ("swim", "swam"), ("drink", "drank"),
    ("speak", "spoke"), ("break", "broke"), ("choose", "chose"), ("drive", "drove"), ("fly", "flew"),
    ("know", "knew"), ("grow", "grew"), ("throw", "threw"), ("begin", "began"), ("bring", "brought"),
    ("think", "thought"), ("teach", "taught"), ("catch", "caught"), ("sleep", "slept"), ("keep", "kept"),
    ("feel", "felt"), ("make", "made"), ("jump", "jumped"), ("play", "played"), ("cook", "cooked"),
    ("stop", "stopped"), ("carry", "carried"),
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"

TASKS: dict[str, tuple[tuple[str, str], ...]] = {
    "antonym": ANTONYMS,
    "country_capital": COUNTRY_CAPITAL,
    "uppercase": tuple((w, w.upper()) for w in UPPERCASE_WORDS),
    "next_letter": tuple((LETTERS[i], LETTERS[i + 1]) for i in range(25)),
    "present_past": PRESENT_PAST,
}


class Lexical(TextTaskFamily):
    name = "lexical"

    def __init__(self, template: str = DEFAULT_TEMPLATE, tasks: tuple[str, ...] = tuple(TASKS)) -> None:
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ConfigError(f"lexical: tasks must be distinct names from {list(TASKS)}, got {list(tasks)}")
        super().__init__(template=template, tasks=list(tasks))
        self.tasks = tasks

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def pool_size(self) -> int:
        return min(len(TASKS[t]) for t in self.tasks)

    def words(self) -> list[str]:
        return [w for t in self.tasks for pair in TASKS[t] for w in pair]

    def max_input_tokens(self) -> int:
        return 1

    def _draw_text(self, task: int, shots: int, rng: np.random.Generator) -> TextPrompt:
        pairs = TASKS[self.tasks[task]]
        idx = draw_distinct(rng, len(pairs), shots + 1)
        x, y = pairs[idx[-1]]
        return TextPrompt(examples=[pairs[i] for i in idx[:-1]], query=x, answer=y, task=task, task_answers=None)
