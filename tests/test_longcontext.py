"""benchmarks.longcontext: RULER-style prompts are deterministic, fit their token budget and score as documented.

A whitespace "tokenizer" keeps these fast and independent of the model; the benchmark uses SmolLM2's.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from benchmarks.longcontext import NOISE, TASKS, WORDS, Recipe, Trial, score
from benchmarks.quality import long_table


def encode(text: str) -> list[int]:
    return [len(w) for w in text.split()]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [512, 2048])
def test_prompts_fill_their_budget_and_are_deterministic(task: str, length: int) -> None:
    trial = Recipe(task).build(encode, length, seed=3)
    n = len(encode(trial.prompt))
    assert n + trial.max_new_tokens <= length
    assert n + trial.max_new_tokens > length - 30  # one noise unit or a few list entries short at most
    assert Recipe(task).build(encode, length, seed=3) == trial
    assert Recipe(task).build(encode, length, seed=4).prompt != trial.prompt
    assert (trial.task, trial.length, trial.seed) == (task, length, 3)


def test_multikey_hides_every_needle_and_asks_for_one() -> None:
    trial = Recipe("multikey", keys=5).build(encode, 1024, seed=0)
    needles = dict(re.findall(r"One of the special magic numbers for (\w+) is: (\d{7})\.", trial.prompt))
    assert len(needles) == 5
    asked = re.search(r"What is the special magic number for (\w+)", trial.prompt).group(1)
    assert trial.answers == (needles[asked],)
    assert trial.prompt.endswith(f"The special magic number for {asked} mentioned in the provided text is")
    assert set(needles) <= set(WORDS)


def test_vartrack_chains_are_in_order_and_the_answer_is_the_asked_chain() -> None:
    trial = Recipe("vartrack", chains=3, hops=2).build(encode, 1024, seed=1)
    statements = re.findall(r"VAR ([A-Z]{5}) = (VAR ([A-Z]{5})|\d{5})\.", trial.prompt)
    assert len(statements) == 3 * 3
    value = int(re.search(r"assigned the value (\d{5}) in the text above", trial.prompt).group(1))
    holds, order = {}, []
    for name, rhs, source in statements:  # follow the assignments in text order: each source is defined first
        holds[name] = holds[source] if source else int(rhs)
        order.append(name)
    assert tuple(sorted(n for n, v in holds.items() if v == value)) == tuple(sorted(trial.answers))
    assert [n for n in order if n in trial.answers] == list(trial.answers)  # the chain in assignment order
    assert len(trial.answers) == 3


def test_commonwords_common_words_are_the_most_frequent() -> None:
    for length in (512, 4096):
        trial = Recipe("commonwords", common=3, ratio=4).build(encode, length, seed=2)
        entries = re.findall(r"^(\d+)\. (\w+)$", trial.prompt, flags=re.M)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        top = [w for w, _ in counts.most_common(3)]
        assert sorted(top) == sorted(trial.answers)
        others = max(c for w, c in counts.items() if w not in trial.answers)
        assert min(counts[w] for w in trial.answers) >= 3 * others


def test_too_short_a_length_is_refused() -> None:
    with pytest.raises(ValueError, match="longer length"):
        Recipe("vartrack").build(encode, 40, seed=0)


def _trial(task: str, answers: tuple[str, ...]) -> Trial:
    return Trial(task, 2048, 0, "prompt", answers, 8)


def test_scores() -> None:
    needle = _trial("multikey", ("1234567",))
    assert score(needle, " 1234567.") == 1.0
    assert score(needle, " 7654321, or 1234567") == 0.0  # the first number counts
    assert score(needle, " not sure") == 0.0
    chain = _trial("vartrack", ("ABCDE", "FGHIJ", "KLMNO"))
    assert score(chain, " ABCDE, FGHIJ and KLMNO.") == 1.0
    assert score(chain, " ABCDE FGHIJX") == pytest.approx(1 / 3)  # whole names only
    words = _trial("commonwords", ("apple", "river"))
    assert score(words, " 1. Apple 2. stone") == 0.5
    assert score(words, " apples, rivers") == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        score(_trial("nope", ()), "")


def test_long_table() -> None:
    rows = [{"config": c, "task": "multikey", "length": 2048, "score": s, "correct": s == 1.0}
            for c, s in (("exact", 1.0), ("exact", 0.0), ("aquakv-2bit", 1.0), ("aquakv-2bit", 1.0))]
    lines = long_table(rows, {"trials": 2})
    assert "| config | multikey 2k |" in lines
    assert "| exact | 1/2 (0.50) |" in lines and "| aquakv-2bit | 2/2 (1.00) |" in lines


def test_noise_has_no_digits() -> None:  # needles and values are the only numbers in the haystack
    assert not re.search(r"\d", NOISE)
