"""Text task families (pos, bitwise_text, lexical): answers checked by rule, tokenization, bad input."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens.errors import ConfigError
from tvlens.tasks import lexical, pos
from tvlens.tasks.text import DEFAULT_TEMPLATE, tokenize_prompts

SIX = ("noun", "adjective", "verb", "adverb", "preposition", "pronoun")




# --------------------------------------------------------------------------- a local tokenizer
def lexicon_words() -> list[str]:
    ws = ["<|endoftext|>", "[UNK]", "->", "\n", "Q:", "A:", "0", "1"]
    for _, words in pos.LEXICON.values():
        ws += words
    ws += list(pos.DETERMINERS)
    for pairs in lexical.TASKS.values():
        for a, b in pairs:
            ws += [a, b]
    return list(dict.fromkeys(ws))


def make_tokenizer(words: list[str], split_digits: bool = True):
    """A word-level tokenizer: words split on spaces, newlines kept as tokens, digits one per token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    pre = [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")]
    if split_digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(lexicon_words())


# --------------------------------------------------------------------------- pos, by rule
# Independent rules for the lexicon's tags (English morphology and closed word classes).
PRONOUNS = {"i", "you", "he", "she", "it", "we", "they", "me", "him", "her", "us", "them"}
PREPOSITIONS = {"near", "under", "behind", "beside", "toward", "above", "across", "beyond", "through", "into",
                "on", "in", "at", "with", "over", "below", "between"}
IRREGULAR_PAST = {"ran", "slept", "swam", "saw", "found"}


def tag_by_rule(word: str) -> str | None:
    if word == "the":
        return "determiner"
    if word in PRONOUNS:
        return "pronoun"
    if word in PREPOSITIONS:
        return "preposition"
    if word.endswith("ly") and word not in {"lazy"}:
        return "adverb"
    if (word.endswith("ed") and len(word) >= 5) or word in IRREGULAR_PAST:  # not "red"
        return "verb"
    return None  # noun or adjective: checked against the lexicon below


def test_lexicon_tags_follow_english_rules():
    tags = pos.word_tags()
    n_words = sum(len(ws) for _, ws in pos.LEXICON.values()) + len(pos.DETERMINERS)
    assert len(tags) == n_words  # no word is listed under two tags
    for word, tag in tags.items():
        rule = tag_by_rule(word)
        if rule is not None:
            assert rule == tag, (word, tag, rule)
        else:
            assert tag in ("noun", "adjective"), (word, tag)
    assert {w for w, t in tags.items() if t == "pronoun"} <= PRONOUNS
    for slot in pos.TEMPLATES:  # every template holds all six tags
        slot_tags = {pos.LEXICON[s][0] for s in slot.split() if s in pos.LEXICON}
        assert slot_tags == set(SIX), slot


def test_pos_answers_by_rule():
    fam = tvlens.tasks.get("pos")
    assert fam.task_names == [*SIX, "null"]
    tags = pos.word_tags()
    texts = fam.sample_text(6, shots=4, seed=3)
    first_positions = set()
    for tp in texts:
        sentences = [x for x, _ in tp.examples] + [tp.query]
        assert len(set(sentences)) == len(sentences)  # distinct sentences, the query's included
        for x, y in [*tp.examples, (tp.query, tp.answer)]:
            words = x.split()
            assert set(SIX) <= {tags[w] for w in words}
            task = fam.task_names[tp.task]
            if task == "null":
                assert y in words and tags[y] != "determiner"
            else:
                first = next(w for w in words if tags[w] == task)
                assert y == first
                first_positions.add((task, words.index(first)))
        for j, task in enumerate(fam.task_names[:-1]):  # every task's rule on the query
            assert tp.task_answers[j] == next(w for w in tp.query.split() if tags[w] == task)
    # the first word of a tag is not always at the same position: the task needs the tags
    for task in SIX:
        assert len({p for t, p in first_positions if t == task}) >= 2, task


def test_bitwise_text_answers_by_rule():
    fam = tvlens.tasks.get("bitwise_text")
    assert fam.task_names == ["and", "nand", "or", "nor", "xor", "xnor", "null"]
    rules = {
        "and": lambda a, b: a == b == "1",
        "nand": lambda a, b: not (a == b == "1"),
        "or": lambda a, b: "1" in (a, b),
        "nor": lambda a, b: a == b == "0",
        "xor": lambda a, b: a != b,
        "xnor": lambda a, b: a == b,
    }
    for tp in fam.sample_text(5, shots=6, seed=1):
        task = fam.task_names[tp.task]
        inputs = [x for x, _ in tp.examples] + [tp.query]
        assert len(set(inputs)) == len(inputs)
        for x, y in [*tp.examples, (tp.query, tp.answer)]:
            a, b = x.split(" ")
            assert len(a) == len(b) == len(y) == 5 and set(a + b + y) <= {"0", "1"}
            if task != "null":
                assert y == "".join("1" if rules[task](p, q) else "0" for p, q in zip(a, b))
        a, b = tp.query.split(" ")
        for j, t in enumerate(fam.task_names[:-1]):
            assert tp.task_answers[j] == "".join("1" if rules[t](p, q) else "0" for p, q in zip(a, b))


def test_lexical_pairs_by_rule():
    T = lexical.TASKS
    for name, pairs in T.items():
        assert len({x for x, _ in pairs}) == len(pairs), name  # every input has one answer
        assert all(" " not in x + y and x != y for x, y in pairs), name
    assert all(y == x.upper() for x, y in T["uppercase"])
    assert all(len(x) == 1 and ord(y) == ord(x) + 1 for x, y in T["next_letter"])
    regular = [(x, y) for x, y in T["present_past"] if y.endswith("ed")]
    assert len(regular) >= 5
    for x, y in regular:  # walk -> walked, stop -> stopped, carry -> carried
        assert y in (x + "ed", x + x[-1] + "ed", x[:-1] + "ied")
    antonyms = dict(T["antonym"])
    assert not set(antonyms) & set(antonyms.values())  # no pair listed both ways
    capitals = dict(T["country_capital"])
    assert capitals["France"] == "Paris" and capitals["Japan"] == "Tokyo" and capitals["Kenya"] == "Nairobi"
    fam = tvlens.tasks.get("lexical")
    for tp in fam.sample_text(4, shots=3, seed=0):
        table = dict(T[fam.task_names[tp.task]])
        for x, y in [*tp.examples, (tp.query, tp.answer)]:
            assert table[x] == y
        assert tp.task_answers is None


def test_templates_and_rendering():
    fam = tvlens.tasks.get("lexical", tasks=("next_letter",))
    tp = fam.sample_text(1, shots=2, seed=0)[0]
    (x1, y1), (x2, y2) = tp.examples
    assert fam.template == DEFAULT_TEMPLATE == "{input} -> {output}\n"
    assert fam.render(tp) == f"{x1} -> {y1}\n{x2} -> {y2}\n{tp.query} -> {tp.answer}"
    qa = tvlens.tasks.get("lexical", tasks=("next_letter",), template="Q: {input}\nA: {output}\n\n")
    tp = qa.sample_text(1, shots=1, seed=0)[0]
    (x1, y1), = tp.examples
    assert qa.render(tp) == f"Q: {x1}\nA: {y1}\n\nQ: {tp.query}\nA: {tp.answer}"


@pytest.mark.parametrize("name", ["pos", "bitwise_text", "lexical"])
def test_tokenized_prompts_line_up(name, tok):
    fam = tvlens.tasks.get(name)
    p = fam.sample(3, shots=4, seed=2, tokenizer=tok, scoring="greedy")
    texts = fam.sample_text(3, shots=4, seed=2)
    assert p.labels.tolist() == [tp.task for tp in texts]
    n_tasks = fam.n_tasks
    assert p.answers.shape == (3 * n_tasks, 1) and p.shots == 4
    for i, tp in enumerate(texts):
        ids = tok.encode(fam.render(tp), add_special_tokens=False)
        n = len(ids) + 1
        # the pieces, tokenized one by one, make the same ids as the whole text; BOS first
        assert p.tokens[i, :n].tolist() == [tok.bos_token_id] + ids
        q, A = int(p.query_pos[i]), int(p.extra["answer_len"][i])
        assert q + 1 + A == n
        full = p.extra["answer_tokens"][i, :A].tolist()
        assert p.tokens[i, q + 1 : q + 1 + A].tolist() == full and int(p.answers[i, 0]) == full[0]
        assert "".join(tok.decode(full).split()) == tp.answer
        assert tok.decode([int(p.tokens[i, q])]) == "->"
        if tp.task_answers is not None:
            assert p.task_answers[i, :, 0].tolist() == [tok.encode(" " + y, add_special_tokens=False)[0]
                                                        for y in tp.task_answers]
        # trained positions: those predicting an answer token, of every example and of the query
        n_trained = sum(len(tok.encode(" " + y, add_special_tokens=False)) for _, y in tp.examples) + A
        assert int(p.train_mask[i].sum()) == n_trained
        m = p.train_mask[i]
        assert (p.targets[i][m] == p.tokens[i][1:][m[:-1]]).all()
        assert bool((p.targets[i][~m] == -100).all())
    if name == "lexical":
        assert p.task_answers is None
    else:
        assert p.task_answers.shape == (len(p), n_tasks, 1)
    assert p.vocab is not None and "->" in p.render(0)


def test_scoring_must_be_chosen_for_multi_token_answers(tok):
    fam = tvlens.tasks.get("bitwise_text")
    with pytest.raises(ConfigError, match="scoring='first_token'.*scoring='greedy'"):
        fam.sample(2, shots=2, seed=0, tokenizer=tok)  # 5-digit answers are 5 tokens here
    whole = make_tokenizer(lexicon_words() + [format(v, "05b") for v in range(32)], split_digits=False)
    p = fam.sample(2, shots=2, seed=0, tokenizer=whole)  # one token per answer: nothing to choose
    assert p.params["scoring"] == "first_token" and int(p.extra["answer_len"].max()) == 1
    with pytest.raises(ConfigError, match="scoring"):
        fam.sample(2, shots=2, seed=0, tokenizer=tok, scoring="first")


def test_bad_input(tok):
    with pytest.raises(ConfigError, match=r"\{output\}"):
        tvlens.tasks.get("pos", template="{input} ->")
    with pytest.raises(ConfigError, match=r"\{input\}"):
        tvlens.tasks.get("lexical", template="-> {output}")
    with pytest.raises(ConfigError, match="before"):
        tvlens.tasks.get("lexical", template="{output} <- {input}")
    fam = tvlens.tasks.get("lexical")  # next_letter has 25 pairs: 24 shots + the query
    assert fam.max_shots() == 24
    fam.sample_text(1, shots=24, seed=0)
    with pytest.raises(ConfigError, match="shots=25.*pool"):
        fam.sample_text(1, shots=25, seed=0)
    with pytest.raises(ConfigError, match="shots=1024"):
        tvlens.tasks.get("bitwise_text").sample(1, shots=1024, tokenizer=tok)
    no_q = make_tokenizer([w for w in lexicon_words() if w != "q"])
    with pytest.raises(ConfigError, match="cannot encode answer 'q' of task 'next_letter'.*unknown token"):
        # 24 shots + the query: every pair of the task is in the prompt
        tvlens.tasks.get("lexical", tasks=("next_letter",)).sample(1, shots=24, seed=0, tokenizer=no_q)
    with pytest.raises(ConfigError, match="unknown ops"):
        tvlens.tasks.get("bitwise_text", ops=("and", "implies"))
    with pytest.raises(ConfigError, match="tasks"):
        tvlens.tasks.get("lexical", tasks=("synonym",))


def test_tokenize_prompts_directly_and_without_bos(tok):
    fam = tvlens.tasks.get("pos")
    texts = fam.sample_text(2, shots=1, seed=0)
    a = tokenize_prompts(fam, texts, tok, prepend_bos=False)
    b = tokenize_prompts(fam, texts, tok)
    assert (a.query_pos + 1 == b.query_pos).all()
    assert torch.equal(a.answers, b.answers) and int(b.tokens[0, 0]) == tok.bos_token_id
    assert a.params["prepend_bos"] is False and b.params["prepend_bos"] is True


@pytest.mark.parametrize("name,params", [("pos", {}), ("bitwise_text", {"separator": ", "}),
                                         ("lexical", {"template": "Q: {input}\nA: {output}\n\n"})])
def test_built_in_word_tokenizer_and_a_synthetic_model(name, params):
    """Without a tokenizer a text family uses its own word tokenizer, so tvlens models train on it."""
    fam = tvlens.tasks.get(name, **params)
    tok = fam.word_tokenizer()
    assert fam.vocab == tok.vocab and fam.vocab[:2] == ["<bos>", "<unk>"]
    p = fam.sample(4, shots=3, seed=0)
    assert int(p.tokens.max()) < fam.d_vocab and tok.unk_token_id not in p.tokens.tolist()
    assert p.seq_len <= fam.seq_len(3)
    for i, tp in enumerate(fam.sample_text(4, shots=3, seed=0)):
        pieces = ["<bos>", *tok.pieces(fam.render(tp))]
        assert p.str_tokens(i)[: len(pieces)] == pieces and "<unk>" not in pieces
    model, hist = tvlens.train(tvlens.TrainConfig(family=fam.config(), steps=2, batch_size=8, n_layers=1,
                                                  d_model=16, n_heads=2, eval_every=2, eval_n_per_task=2),
                               progress=False)
    assert model.cfg.d_vocab == fam.d_vocab and hist[-1]["step"] == 2


def test_shuffled_labels_of_text_prompts_permute_the_examples_answers():
    # the corrupted run of EAP-IG / CIE on a pretrained model: each example's answer moves to another example
    from tvlens.positions import shuffle_labels

    fam = tvlens.tasks.get("pos")
    p = fam.sample(3, shots=3, seed=0)
    c = shuffle_labels(p, seed=0)
    texts = fam.sample_text(3, shots=3, seed=0)
    for i, tp in enumerate(texts):
        q = int(p.query_pos[i])
        assert torch.equal(p.tokens[i, q:], c.tokens[i, q:])  # the query and its answer stay
        words = c.render(i).split("\n")[: len(tp.examples)]
        got = [w.split("->")[1].strip() for w in words]
        orig = [y for _, y in tp.examples]
        assert sorted(got) == sorted(orig) and (got != orig or len(set(orig)) < len(orig))
        assert [w.split("->")[0].replace("<bos>", "").strip() for w in words] == [x for x, _ in tp.examples]
    assert not torch.equal(c.tokens, p.tokens)
    two = tvlens.tasks.get("lexical", tasks=("uppercase",)).sample(2, shots=3, seed=1)
    assert not torch.equal(shuffle_labels(two, seed=0).tokens, two.tokens)
