"""``pos``: "the first word in the sentence with part-of-speech tag T" (Han et al.'s POS family).

Tasks: ``noun``, ``adjective``, ``verb``, ``adverb``, ``preposition``, ``pronoun``, plus ``null``
(a random word of the sentence). The paper drew sentences from the Penn Treebank, which cannot be
shipped; here sentences come from :data:`LEXICON` (every word has exactly one tag, and no word is
ambiguous in these templates) and :data:`TEMPLATES`, each holding all six tags, in several orders so
that the first word of a tag sits at different positions. ``"the"`` is a determiner (no task's
answer). A family draws a fixed corpus of ``n_sentences`` sentences (``corpus_seed``), as a
treebank would be, and prompts draw distinct sentences from it.

Example (``adjective``, default template)::

    the brave child followed him across the river -> brave
    she slept under the warm tree quietly -> warm
    ...
"""

from __future__ import annotations

import numpy as np

from tvlens.tasks.base import check_int
from tvlens.tasks.text import DEFAULT_TEMPLATE, TextPrompt, TextTaskFamily, draw_distinct

TAGS = ("noun", "adjective", "verb", "adverb", "preposition", "pronoun")

# Slot name -> (tag, words). Verbs are past tense (no agreement); subject and object pronouns fill
# their own slots. Every word appears once in the whole lexicon.
LEXICON: dict[str, tuple[str, tuple[str, ...]]] = {
    "NOUN": ("noun", ("dog", "cat", "house", "river", "teacher", "garden", "book", "car", "child", "city",
                      "tree", "table", "bird", "friend", "window", "boat", "farmer", "mountain", "letter", "horse")),
    "ADJ": ("adjective", ("happy", "red", "old", "small", "bright", "tall", "green", "warm", "heavy", "brave",
                          "tiny", "young", "cold", "gentle", "famous", "empty", "lazy", "clever", "dark", "noisy")),
    "IVERB": ("verb", ("walked", "slept", "ran", "jumped", "smiled", "waited", "laughed", "danced", "swam",
                       "arrived", "stayed", "rested")),
    "TVERB": ("verb", ("saw", "found", "painted", "followed", "carried", "watched", "visited", "liked",
                       "cleaned", "pushed", "chased", "helped")),
    "ADV": ("adverb", ("quickly", "slowly", "quietly", "happily", "rarely", "carefully", "loudly", "gently",
                       "suddenly", "eagerly", "calmly", "softly")),
    "PREP": ("preposition", ("near", "under", "behind", "beside", "toward", "above", "across", "beyond",
                             "through", "into")),
    "SPRON": ("pronoun", ("she", "he", "they", "we", "you")),
    "OPRON": ("pronoun", ("her", "him", "them", "us", "me")),
}
DETERMINERS = ("the",)

# Every template holds all six tags.
TEMPLATES: tuple[str, ...] = (
    "the ADJ NOUN IVERB ADV PREP OPRON",
    "SPRON ADV TVERB the ADJ NOUN PREP the NOUN",
    "PREP the NOUN SPRON TVERB the ADJ NOUN ADV",
    "the NOUN TVERB OPRON ADV PREP the ADJ NOUN",
    "SPRON IVERB PREP the ADJ NOUN ADV",
    "ADV the ADJ NOUN TVERB OPRON PREP the NOUN",
    "the ADJ NOUN ADV TVERB OPRON PREP the NOUN",
    "PREP the ADJ NOUN SPRON ADV IVERB",
)


def word_tags() -> dict[str, str]:
    """Every lexicon word's tag (determiners have tag ``"determiner"``)."""
    out = {w: "determiner" for w in DETERMINERS}
    for tag, words in LEXICON.values():
        for w in words:
            out[w] = tag
    return out


class Pos(TextTaskFamily):
    name = "pos"

    def __init__(self, template: str = DEFAULT_TEMPLATE, null: bool = True, n_sentences: int = 2000,
                 corpus_seed: int = 0) -> None:
        n_sentences = check_int("n_sentences", n_sentences, 2, self.name)
        corpus_seed = check_int("corpus_seed", corpus_seed, 0, self.name)
        super().__init__(template=template, null=bool(null), n_sentences=n_sentences, corpus_seed=corpus_seed)
        self.null = bool(null)
        self.corpus = self._corpus(n_sentences, corpus_seed)

    @property
    def task_names(self) -> list[str]:
        return list(TAGS) + (["null"] if self.null else [])

    @staticmethod
    def _corpus(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
        """``n`` distinct sentences as (words, tags)."""
        rng = np.random.default_rng(seed)
        seen: set[str] = set()
        out = []
        while len(out) < n:
            template = TEMPLATES[int(rng.integers(len(TEMPLATES)))].split()
            words, tags = [], []
            for slot in template:
                if slot in LEXICON:
                    tag, choices = LEXICON[slot]
                    w = choices[int(rng.integers(len(choices)))]
                    while w in words:  # no repeated word in a sentence
                        w = choices[int(rng.integers(len(choices)))]
                    words.append(w)
                    tags.append(tag)
                else:
                    words.append(slot)
                    tags.append("determiner")
            s = " ".join(words)
            if s not in seen:
                seen.add(s)
                out.append((words, tags))
        return out

    def pool_size(self) -> int:
        return len(self.corpus)

    def words(self) -> list[str]:
        return list(word_tags())

    def max_input_tokens(self) -> int:
        return max(len(t.split()) for t in TEMPLATES)

    def _answers(self, words: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
        out = [words[tags.index(t)] for t in TAGS]
        if self.null:
            content = [w for w, t in zip(words, tags) if t != "determiner"]
            out.append(content[int(rng.integers(len(content)))])
        return out

    def _draw_text(self, task: int, shots: int, rng: np.random.Generator) -> TextPrompt:
        idx = draw_distinct(rng, len(self.corpus), shots + 1)
        examples = []
        for i in idx[:-1]:
            words, tags = self.corpus[i]
            examples.append((" ".join(words), self._answers(words, tags, rng)[task]))
        words, tags = self.corpus[idx[-1]]
        answers = self._answers(words, tags, rng)
        return TextPrompt(examples=examples, query=" ".join(words), answer=answers[task], task=task,
                          task_answers=answers)
