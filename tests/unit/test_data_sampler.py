"""PromptSampler: deterministic order, per-epoch reshuffle, exact resume from state_dict."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egrsd_megatron.data import Problem, PromptSampler

PROBS = [Problem(f"p{i}", "s", str(i), i, "mem") for i in range(7)]


def _ids(batch):
    return [p.index for p in batch]


def test_epochs_are_permutations_and_reshuffle():
    s = PromptSampler(PROBS, seed=3)
    e0, e1, e2 = _ids(s.next_batch(7)), _ids(s.next_batch(7)), _ids(s.next_batch(7))
    for e in (e0, e1, e2):
        assert sorted(e) == list(range(7))
    assert len({tuple(e0), tuple(e1), tuple(e2)}) == 3  # a new order each epoch
    assert s.state_dict()["epoch"] == 2
    assert _ids(PromptSampler(PROBS, seed=3).next_batch(21)) == e0 + e1 + e2  # batches cross epochs
    assert _ids(PromptSampler(PROBS, seed=4).next_batch(7)) != e0
    assert _ids(PromptSampler(PROBS, seed=3, shuffle=False).next_batch(9)) == list(range(7)) + [0, 1]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    sizes=st.lists(st.integers(1, 10), min_size=1, max_size=8),
    more=st.lists(st.integers(1, 10), min_size=1, max_size=5),
)
def test_resume_reproduces_continuation(seed, sizes, more):
    a = PromptSampler(PROBS, seed=seed)
    for n in sizes:
        a.next_batch(n)
    state = a.state_dict()
    expected = [_ids(a.next_batch(n)) for n in more]
    b = PromptSampler(PROBS, seed=0)  # a fresh sampler with another seed: the state wins
    b.load_state_dict(state)
    assert [_ids(b.next_batch(n)) for n in more] == expected


def test_bad_state_and_args():
    s = PromptSampler(PROBS, seed=1)
    with pytest.raises(ValueError, match="7 problems.*5 problems|saw 7 problems, this dataset has 5"):
        PromptSampler(PROBS[:5], seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="no 'pos'"):
        s.load_state_dict({"seed": 1, "epoch": 0, "shuffle": True, "num_problems": 7})
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], seed=1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        s.next_batch(0)
