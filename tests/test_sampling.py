"""Task sampling: probabilities by formula, empirical frequencies, round robin, exact resume."""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest

from xmodal.training.sampling import BLOCK, TaskSampler

SIZES = {"cls": 8000, "sent": 1500, "ret": 500}


def _draw(sampler, n):
    return list(itertools.islice(sampler, n))


def test_probabilities_by_formula():
    total = sum(SIZES.values())
    p = TaskSampler(SIZES).probabilities()
    assert p == pytest.approx({t: n / total for t, n in SIZES.items()})
    p2 = TaskSampler(SIZES, "temperature", temperature=2.0).probabilities()
    z = sum(math.sqrt(n) for n in SIZES.values())
    assert p2 == pytest.approx({t: math.sqrt(n) / z for t, n in SIZES.items()})
    assert TaskSampler(SIZES, "temperature", temperature=1.0).probabilities() == pytest.approx(p)
    assert TaskSampler(SIZES, "temperature", temperature=math.inf).probabilities() == pytest.approx(
        {t: 1 / 3 for t in SIZES})
    assert TaskSampler(SIZES, "round_robin").probabilities() == pytest.approx({t: 1 / 3 for t in SIZES})
    # huge sizes and a small temperature do not overflow
    big = TaskSampler({"a": 10**12, "b": 10**11}, "temperature", temperature=0.01).probabilities()
    assert big["a"] == pytest.approx(1.0)


@pytest.mark.parametrize("strategy,temperature", [("proportional", 1.0), ("temperature", 3.0)])
def test_empirical_frequencies(strategy, temperature):
    sampler = TaskSampler(SIZES, strategy, temperature=temperature, seed=7)
    counts = Counter(_draw(sampler, 20_000))
    for t, p in sampler.probabilities().items():
        assert abs(counts[t] / 20_000 - p) < 0.01


def test_round_robin_exact():
    assert _draw(TaskSampler(SIZES, "round_robin"), 7) == ["cls", "sent", "ret", "cls", "sent", "ret", "cls"]


def test_deterministic_and_seed_dependent():
    a = _draw(TaskSampler(SIZES, seed=1), 500)
    assert a == _draw(TaskSampler(SIZES, seed=1), 500)
    assert a != _draw(TaskSampler(SIZES, seed=2), 500)


@pytest.mark.parametrize("strategy", ["proportional", "round_robin", "temperature"])
def test_resume_continues_the_same_sequence(strategy):
    n = BLOCK + 123  # across a block boundary
    full = _draw(TaskSampler(SIZES, strategy, temperature=2.0, seed=5), n + 300)
    first = TaskSampler(SIZES, strategy, temperature=2.0, seed=5)
    assert _draw(first, n) == full[:n]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (position.json)
    resumed = TaskSampler(SIZES, strategy, temperature=2.0, seed=5)
    resumed.load_state_dict(state)
    assert _draw(resumed, 300) == full[n:]
    assert _draw(TaskSampler(SIZES, strategy, temperature=2.0, seed=5, position=n), 300) == full[n:]
    with pytest.raises(ValueError, match="seed"):
        TaskSampler(SIZES, strategy, temperature=2.0, seed=6).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError):
        TaskSampler({})
    with pytest.raises(ValueError):
        TaskSampler({"a": 0})
    with pytest.raises(ValueError):
        TaskSampler(SIZES, "annealed")
    with pytest.raises(ValueError):
        TaskSampler(SIZES, "temperature", temperature=0)
