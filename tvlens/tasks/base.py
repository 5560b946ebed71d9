"""The TaskFamily interface and the shared builder of token prompts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch

from tvlens.checks import check_memory, check_names, check_seed
from tvlens.errors import ConfigError, UnknownNameError
from tvlens.prompts import PromptSet
from tvlens.tasks.registry import registered_module

ARROW = "->"
END = ";"


def check_int(name: str, value: Any, minimum: int, family: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{family}: {name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{family}: {name} must be >= {minimum}, got {value}")
    return int(value)


class TaskFamily(ABC):
    """A family of ICL tasks. ``sample()`` draws a PromptSet with known latent tasks from a seed."""

    name: str = "family"
    continuous: bool = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    @property
    @abstractmethod
    def task_names(self) -> list[str]: ...

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def null_task(self) -> int | None:
        return self.task_names.index("null") if "null" in self.task_names else None

    @property
    def vocab(self) -> list[str] | None:
        return None

    @property
    def d_vocab(self) -> int:
        v = self.vocab
        if v is None:
            raise ConfigError(f"{self.name} is continuous and has no vocabulary")
        return len(v)

    @property
    def d_in(self) -> int:
        raise ConfigError(f"{self.name} is a token family and has no input dimension")

    def max_shots(self) -> int:
        return 10_000

    def seq_len(self, shots: int) -> int:
        return len(self.sample(1, shots=shots, seed=0).model_input[0])

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({ps})"

    def config(self) -> dict[str, Any]:
        """Name and parameters: ``tvlens.tasks.get(**family.config())`` rebuilds the family. A family
        registered from outside tvlens also records its module (``"_module"``), so a checkpoint reopened in
        another process can say which module to import to register it again."""
        module = registered_module(self.name)
        return {"name": self.name, **self.params, **({"_module": module} if module else {})}

    def _task_ids(self, tasks: Sequence[str | int] | None) -> list[int]:
        if tasks is None:
            return list(range(self.n_tasks))
        tasks = check_names(tasks, "tasks", where=f"{self.name}.sample", allow_index=True)  # "color" is one task
        out = []
        for t in tasks:
            if isinstance(t, str):
                if t not in self.task_names:
                    raise UnknownNameError(f"unknown task {t!r} for family {self.name!r}; known: {self.task_names}")
                out.append(self.task_names.index(t))
            else:
                if not 0 <= int(t) < self.n_tasks:
                    raise ConfigError(f"task index {t} out of range for {self.name!r} ({self.n_tasks} tasks)")
                out.append(int(t))
        if not out:
            raise ConfigError("tasks must name at least one task")
        return out

    def sample(
        self,
        n_per_task: int,
        shots: int = 4,
        seed: int = 0,
        tasks: Sequence[str | int] | None = None,
    ) -> PromptSet:
        """Draw ``n_per_task`` prompts of each task (task-major order) with ``shots`` examples each."""
        labels, shots, rng = self._sampling_plan(n_per_task, shots, seed, tasks)
        if len(labels) * (shots + 1) > 100_000:  # one estimate for every large draw (many prompts or many shots)
            self._check_sample_memory(labels, shots)
        return self._sample(labels, shots, rng)

    def _check_sample_memory(self, labels: np.ndarray, shots: int) -> None:
        """Refuse, before building it, a PromptSet that cannot fit in memory (estimated from one prompt)."""
        one = self._sample(labels[:1], shots, np.random.default_rng(0))
        per_prompt = sum(v.element_size() * v.nelement() for v in vars(one).values() if torch.is_tensor(v))
        check_memory(4 * per_prompt * len(labels), f"sampling {len(labels)} prompts ({shots}-shot)",
                     "n_per_task (or shots, or the tasks sampled); sample in several smaller draws", where=self.name)

    def _sampling_plan(self, n_per_task, shots, seed, tasks) -> tuple[np.ndarray, int, np.random.Generator]:
        """Checked arguments of ``sample``: each prompt's task (task-major order), the shots, the generator."""
        n_per_task = check_int("n_per_task", n_per_task, 1, self.name)
        shots = check_int("shots", shots, 0, self.name)
        seed = check_seed(seed, where=f"{self.name}.sample", maximum=None)
        if shots > self.max_shots():
            raise ConfigError(
                f"{self.name}: shots={shots} is more than this family can fill with distinct examples "
                f"(at most {self.max_shots()} with these parameters{self._pool_note()})"
            )
        task_ids = self._task_ids(tasks)
        return np.repeat(np.array(task_ids), n_per_task), shots, np.random.default_rng(seed)

    def _pool_note(self) -> str:
        return ""

    def sample_train(self, n_per_task: int, shots: int = 4, seed: int = 0) -> PromptSet:
        """The prompts training draws; the same as ``sample`` unless a family defines a curriculum."""
        return self.sample(n_per_task, shots=shots, seed=seed)

    @abstractmethod
    def _sample(self, labels: np.ndarray, shots: int, rng: np.random.Generator) -> PromptSet: ...


class TokenTaskFamily(TaskFamily):
    """A family of token tasks. Prompt layout (example, then the query)::

        <input tokens> -> <answer tokens> ; ... <query input tokens> -> <query answer tokens>

    ``query_pos`` is the query's ``->``; the answer positions of every example and of the query are
    trained. A family whose ``query_arrow`` is False writes the query without the ``->`` (its last
    input token then is the query position; see ``shift(marked_query=True)``).

    To define your own, the simplest is :class:`RuleFamily` (words, rules, a way to draw an input).
    For full control subclass this and give ``task_names``, ``vocab`` (ending with ``"->"`` and ``";"``)
    and ``draw(task, shots, rng)``: the examples' ``(input ids, answer ids)``, the query's input ids and
    the answer every task's rule gives on the query (one list per task, in ``task_names`` order).
    """

    query_arrow: bool = True

    def draw(
        self, task: int, shots: int, rng: np.random.Generator
    ) -> tuple[list[tuple[list[int], list[int]]], list[int], list[list[int]]]:
        """One prompt of ``task``: ``(examples, query_input, answers_of_every_task)`` as token ids (the
        public hook to implement; the shipped families implement ``_draw``, which this calls)."""
        raise NotImplementedError(f"{type(self).__name__} must implement draw(task, shots, rng) "
                                  "(see tvlens.tasks.TokenTaskFamily), or subclass tvlens.tasks.RuleFamily")

    def _draw(
        self, task: int, shots: int, rng: np.random.Generator
    ) -> tuple[list[tuple[list[int], list[int]]], list[int], list[list[int]]]:
        return self.draw(task, shots, rng)

    def _sample(self, labels: np.ndarray, shots: int, rng: np.random.Generator) -> PromptSet:
        vocab = self.vocab
        assert vocab is not None
        arrow, end = vocab.index(ARROW), vocab.index(END)
        seqs, masks, qpos, answers, task_answers = [], [], [], [], []
        for task in labels:
            examples, q_in, q_answers = self._draw(int(task), shots, rng)
            seq: list[int] = []
            mask: list[bool] = []
            for inp, ans in examples:
                # the arrow and all but the last answer token predict the answer's tokens
                seq += inp + [arrow]
                mask += [False] * len(inp) + [True]
                seq += ans + [end]
                mask += [True] * (len(ans) - 1) + [False, False]
            if self.query_arrow:
                seq += q_in + [arrow]
                mask += [False] * len(q_in) + [True]
            else:
                seq += q_in
                mask += [False] * (len(q_in) - 1) + [True]
            q = len(seq) - 1
            seq += q_answers[task]
            mask += [True] * (len(q_answers[task]) - 1) + [False]
            seqs.append(seq)
            masks.append(mask)
            qpos.append(q)
            answers.append(q_answers[task])
            task_answers.append(q_answers)
        if len({len(q) for q in seqs}) > 1:
            raise ConfigError(f"{self.name}: prompts of different lengths ({sorted({len(q) for q in seqs})} tokens): "
                              "every input and answer of a family must have one length per shots")
        tokens = torch.tensor(seqs, dtype=torch.long)
        train_mask = torch.tensor(masks, dtype=torch.bool)
        targets = torch.full_like(tokens, -100)
        targets[:, :-1] = torch.where(train_mask[:, :-1], tokens[:, 1:], torch.tensor(-100))
        return PromptSet(
            family=self.name,
            params=dict(self.params),
            task_names=list(self.task_names),
            labels=torch.as_tensor(labels, dtype=torch.long),
            query_pos=torch.tensor(qpos, dtype=torch.long),
            answers=torch.tensor(answers, dtype=torch.long),
            targets=targets,
            train_mask=train_mask,
            shots=shots,
            tokens=tokens,
            task_answers=torch.tensor(task_answers, dtype=torch.long),
            vocab=list(vocab),
        )


class RuleFamily(TokenTaskFamily):
    """Your own token task family from its words and rules. Subclass and set:

    - ``words``: the content words (``"->"`` and ``";"`` are added to form the vocabulary);
    - ``rules``: ``{task name: rule}``, each rule mapping an input (a list of words) to its answer (a
      word or a list of words; every rule's answers must have the same length);
    - ``draw_input(self, rng)``: a random input, a list of words, from ``rng`` (a numpy Generator).

    >>> class Ends(tvlens.tasks.RuleFamily):
    ...     words = list("abcdefgh")
    ...     rules = {"first": lambda xs: xs[0], "last": lambda xs: xs[-1]}
    ...     def draw_input(self, rng):
    ...         return list(rng.choice(self.words, size=3, replace=False))
    >>> tvlens.tasks.register("ends", Ends)
    >>> prompts = tvlens.tasks.get("ends").sample(50, shots=4, seed=0)

    Constructor keywords (``def __init__(self, length=3): super().__init__(length=length)``) are the
    family's parameters: they are recorded with a trained model and passed back when it is reopened.
    """

    words: Sequence[str] = ()
    rules: dict[str, Any] = {}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if type(self).name == TaskFamily.name:  # not registered (yet): the class name; get() sets the registered one
            self.name = type(self).__name__.lower()
        if isinstance(self.words, str) or not all(isinstance(w, str) for w in self.words):
            raise ConfigError(f"{type(self).__name__}.words must be a list of words (strings), got {self.words!r:.80}")
        words = list(self.words)
        blank = [w for w in words if not w.strip() or w != w.strip() or any(c.isspace() for c in w)]
        if blank:
            raise ConfigError(f"{type(self).__name__}.words holds {blank[0]!r}: a word must be non-empty, without "
                              "spaces (prompts are written and read back as space-separated words)")
        if not words or len(set(words)) != len(words) or ARROW in words or END in words:
            raise ConfigError(f"{type(self).__name__}.words must be distinct words (not {ARROW!r} or {END!r}); "
                              f"got {list(self.words)[:10]}")
        if not isinstance(self.rules, dict) or not self.rules or not all(callable(r) for r in self.rules.values()):
            raise ConfigError(f"{type(self).__name__}.rules must be a non-empty dict of task name -> rule(input words)")
        self._vocab = words + [ARROW, END]
        self._ids = {w: i for i, w in enumerate(self._vocab)}
        self._rules = list(self.rules.values())

    @property
    def task_names(self) -> list[str]:
        return list(self.rules)

    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    def draw_input(self, rng: np.random.Generator) -> Sequence[str]:
        raise NotImplementedError(f"{type(self).__name__} must implement draw_input(self, rng) -> list of words")

    def _encode(self, words: Any, what: str) -> list[int]:
        if isinstance(words, (str, np.str_)):
            words = [str(words)]
        elif isinstance(words, (list, tuple, np.ndarray)):
            words = list(words)
        else:
            raise ConfigError(f"{type(self).__name__}: {what} must give a word or a list of words, got "
                              f"{words!r:.80} ({type(words).__name__})")
        bad = [w for w in words if not isinstance(w, (str, np.str_))]
        if bad:
            raise ConfigError(f"{type(self).__name__}: {what} must give words (strings), got {bad[0]!r:.80} "
                              f"({type(bad[0]).__name__})")
        sep = [w for w in words if str(w) in (ARROW, END)]
        if sep:
            raise ConfigError(f"{type(self).__name__}: {what} gives the separator token {str(sep[0])!r}; inputs and "
                              f"answers must be content words (from words), not {ARROW!r} or {END!r}")
        try:
            return [self._ids[str(w)] for w in words]
        except KeyError as e:
            raise ConfigError(f"{type(self).__name__}: {what} uses {e.args[0]!r}, which is not in words") from None

    def _apply(self, name: str, rule: Any, inp: list[str]) -> list[int]:
        try:
            out = rule(list(inp))
        except Exception as e:  # a user's rule: say which one failed, on which input
            raise ConfigError(f"{type(self).__name__}: rule {name!r} failed on the input {inp}: "
                              f"{type(e).__name__}: {e}") from e
        return self._encode(out, f"rule {name!r} (on {inp})")

    def draw(self, task, shots, rng):
        def one() -> tuple[list[int], list[list[int]]]:
            raw = self.draw_input(rng)
            inp_ids = self._encode(raw, "draw_input")
            inp = [self._vocab[i] for i in inp_ids]
            if not inp:
                raise ConfigError(f"{type(self).__name__}: draw_input gave an empty input; give at least one word")
            answers = [self._apply(name, rule, inp) for name, rule in self.rules.items()]
            if len({len(a) for a in answers}) != 1 or not answers[0]:
                raise ConfigError(f"{type(self).__name__}: every rule must answer with the same number (>= 1) of "
                                  f"words; on {inp} they give {[len(a) for a in answers]}")
            return inp_ids, answers

        examples = []
        for _ in range(shots):
            inp, answers = one()
            examples.append((inp, answers[task]))
        q_in, q_answers = one()
        return examples, q_in, q_answers
