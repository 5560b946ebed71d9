"""tvlens.positions: where a prompt's task is read and written, checked on sampled prompts (no model)."""

from __future__ import annotations

import pytest
import torch

from tvlens import tasks
from tvlens.errors import ConfigError
from tvlens.positions import (
    answer_token_positions,
    at_answer_positions,
    position_mask,
    prompt_answer_positions,
    representation_mask,
    shuffle_labels,
    trim_to_answers,
)


@pytest.fixture(scope="module")
def prompts():
    return tasks.get("bitwise").sample(3, shots=3, seed=0)


def test_answer_positions_predict_the_answer_tokens(prompts):
    pos = prompt_answer_positions(prompts)
    assert torch.equal(pos[:, 0], prompts.query_pos)
    rows = torch.arange(len(prompts))[:, None]
    # the answer tokens sit one after the positions that predict them, and are the targets there
    assert torch.equal(prompts.tokens[rows, answer_token_positions(prompts)], prompts.answers)
    assert torch.equal(prompts.targets[rows, pos], prompts.answers)
    x = torch.arange(prompts.tokens.shape[1]).expand(len(prompts), -1)[..., None].float()
    assert torch.equal(at_answer_positions(x, prompts.query_pos, prompts.n_answer)[..., 0], pos.float())


def test_representation_masks(prompts):
    q = representation_mask(prompts, "query")
    assert torch.equal(q.float().argmax(1), prompts.query_pos) and bool((q.sum(1) == 1).all())
    a = representation_mask(prompts, "answers")
    width = a.shape[1]
    # the examples' answer tokens: trained-to-predict positions shifted by one, all before the query
    assert bool(a[:, 1:].eq(prompts.train_mask[:, : width - 1] & a[:, 1:]).all())
    assert int(a.sum(1).min()) >= prompts.shots * prompts.n_answer
    assert bool((a.float().argmax(1) < prompts.query_pos).all())
    with pytest.raises(ConfigError, match="at must be one of"):
        representation_mask(prompts, "middle")


def test_position_mask(prompts):
    seq = prompts.tokens.shape[1]
    assert bool(position_mask(prompts, None, seq).all())
    assert torch.equal(position_mask(prompts, "query", seq)[:, : int(prompts.query_pos.max()) + 1],
                       representation_mask(prompts, "query").cpu())
    with pytest.raises(ConfigError, match="boolean mask"):
        position_mask(prompts, torch.zeros(len(prompts), seq + 1, dtype=torch.bool), seq)


def test_shuffled_labels_keep_the_query_and_move_the_examples(prompts):
    c = shuffle_labels(prompts, seed=0)
    rows = torch.arange(len(prompts))[:, None]
    assert torch.equal(c.tokens[rows, answer_token_positions(prompts)], prompts.answers)
    changed = (c.tokens != prompts.tokens).any(1)
    ex = representation_mask(prompts, "answers")  # the examples' answer tokens
    for i in range(len(prompts)):
        labels = prompts.tokens[i, : ex.shape[1]][ex[i]].view(-1, prompts.n_answer).tolist()
        if len({tuple(a) for a in labels}) == len(labels):  # distinct labels: a non-identity permutation shows
            assert bool(changed[i]), i
    assert bool(changed.any())
    assert torch.equal(c.tokens.sort(1).values, prompts.tokens.sort(1).values)  # the same tokens, moved


def test_trim_to_answers(prompts):
    t = trim_to_answers(prompts)
    assert t.tokens.shape[1] == int(prompts.query_pos.max()) + prompts.n_answer
    assert torch.equal(t.tokens, prompts.tokens[:, : t.tokens.shape[1]])
