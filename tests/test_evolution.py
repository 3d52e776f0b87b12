import itertools
import json
import logging

import numpy as np
import pytest

from optimum_evopress.search import evolution
from optimum_evopress.search import (LevelSpace, SearchSettings, brute_force_search, dynamic_programming_search,
                                     evolutionary_search, multi_step_selection, one_at_a_time_search, random_search)

N, K = 12, 4
WEIGHTS = np.random.default_rng(42).uniform(0.1, 1.0, N)


def space():
    return LevelSpace(units=[f"u{i}" for i in range(N)], levels=[("kept", "dropped")] * N, costs=[(0, 1)] * N,
                      budget=K)


def true_fitness(assignment):
    a = np.array(assignment)
    # Not additive: dropping neighbours together costs extra, as with real blocks.
    return float(a @ WEIGHTS + 0.5 * np.sum(a[1:] * a[:-1]))


def make_evaluate(noise=0.0, log=None):
    def evaluate(candidates, num_tokens, rng, reference=None):
        offset = rng.normal(0, noise / np.sqrt(num_tokens), size=len(candidates)) if noise else [0.0] * len(candidates)
        if log is not None:
            log.append((list(candidates), num_tokens))
        return [true_fitness(c) + o for c, o in zip(candidates, offset)]
    return evaluate


SETTINGS = SearchSettings(generations=40, offspring=8, survivors_per_selection=(3, 1), tokens_per_selection=(64, 512),
                          initial_candidates=4, max_flips=3, seed=0)


def optimum():
    return min((c for c in itertools.product((0, 1), repeat=N) if sum(c) == K), key=true_fitness)


def test_finds_the_optimum_of_a_non_additive_problem():
    result = evolutionary_search(space(), make_evaluate(noise=0.5), SETTINGS, progress=False)
    assert space().is_valid(result.assignment)
    assert result.assignment == optimum()
    assert len(result.history) == SETTINGS.generations + 1


def test_parent_fitness_never_gets_worse_without_noise():
    result = evolutionary_search(space(), make_evaluate(), SETTINGS, progress=False)
    values = [row["fitness"] for row in result.history]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_offspring_are_distinct_and_selection_follows_the_stages():
    log = []
    evolutionary_search(space(), make_evaluate(log=log), SearchSettings(**{**SETTINGS.__dict__, "generations": 3}),
                        progress=False)
    generation_calls = log[2:]  # the initial best-of-4 used two stages too
    for stage1, stage2 in zip(generation_calls[0::2], generation_calls[1::2]):
        children, tokens1 = stage1
        finalists, tokens2 = stage2
        assert (tokens1, tokens2) == (64, 512)
        assert len(children) == 8 and len(set(children)) == 8
        assert len(finalists) == 3 + 1  # three survivors and the parent (elitism)
        assert finalists[-1] not in children  # the parent is never its own offspring


def test_same_seed_same_result_and_other_seed_other_path():
    a = evolutionary_search(space(), make_evaluate(noise=1.0), SETTINGS, progress=False)
    b = evolutionary_search(space(), make_evaluate(noise=1.0), SETTINGS, progress=False)
    c = evolutionary_search(space(), make_evaluate(noise=1.0), SearchSettings(**{**SETTINGS.__dict__, "seed": 1}),
                            progress=False)
    assert a.assignment == b.assignment
    assert [r["fitness"] for r in a.history] == [r["fitness"] for r in b.history]
    assert [r["fitness"] for r in a.history] != [r["fitness"] for r in c.history]


def test_resumed_search_continues_exactly(tmp_path):
    state = tmp_path / "state.json"
    full = evolutionary_search(space(), make_evaluate(noise=1.0), SETTINGS, progress=False)
    short = SearchSettings(**{**SETTINGS.__dict__, "generations": 15})
    evolutionary_search(space(), make_evaluate(noise=1.0), short, checkpoint_path=str(state), progress=False)
    resumed = evolutionary_search(space(), make_evaluate(noise=1.0), SETTINGS, checkpoint_path=str(state),
                                  resume_from=str(state), progress=False)
    assert resumed.assignment == full.assignment
    assert [r["fitness"] for r in resumed.history] == [r["fitness"] for r in full.history]


def test_resume_rejects_another_space_or_settings(tmp_path):
    state = tmp_path / "state.json"
    evolutionary_search(space(), make_evaluate(), SearchSettings(**{**SETTINGS.__dict__, "generations": 2}),
                        checkpoint_path=str(state), progress=False)
    other_space = LevelSpace(units=space().units, levels=space().levels, costs=space().costs, budget=K + 1)
    with pytest.raises(ValueError, match="another model"):
        evolutionary_search(other_space, make_evaluate(), SETTINGS, resume_from=str(state), progress=False)
    with pytest.raises(ValueError, match="other search settings"):
        evolutionary_search(space(), make_evaluate(), SearchSettings(**{**SETTINGS.__dict__, "offspring": 5}),
                            resume_from=str(state), progress=False)
    state.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        evolutionary_search(space(), make_evaluate(), SETTINGS, resume_from=str(state), progress=False)
    with pytest.raises(FileNotFoundError):
        evolutionary_search(space(), make_evaluate(), SETTINGS, resume_from=str(tmp_path / "none.json"),
                            progress=False)


def test_multi_step_selection_keeps_the_elite_when_it_is_best():
    best = optimum()
    worse = [c for c in itertools.islice(itertools.product((0, 1), repeat=N), 5000) if sum(c) == K][:6]
    winner, score, used = multi_step_selection(worse, make_evaluate(), (2, 1), (10, 20),
                                               np.random.default_rng(0), elite=best)
    assert winner == best and score == true_fitness(best) and used == 6 * 10 + 3 * 20


def test_nan_scores_rank_last_keeping_the_order_of_the_others(monkeypatch, caplog):
    monkeypatch.setattr(evolution, "_nan_warned", False)
    nan = float("nan")
    nan_first = lambda candidates, n, rng, elite: [nan if c == (0, 1) else 2.0 for c in candidates]  # noqa: E731
    winner, score, _ = multi_step_selection([(0, 1), (1, 0)], nan_first, (1,), (8,), np.random.default_rng(0))
    assert winner == (1, 0) and score == 2.0
    # Stable for the rest: ties keep the earlier candidate; the NaN ones go last, in their order.
    scores = {"a": 1.0, "b": nan, "c": 1.0, "d": 0.0, "e": nan, "f": 3.0}
    pools = []

    def evaluate(candidates, num_tokens, rng, elite):
        pools.append(list(candidates))
        return [scores[c] for c in candidates]

    with caplog.at_level(logging.WARNING, logger=evolution.__name__):
        multi_step_selection(list(scores), evaluate, (6, 1), (8, 8), np.random.default_rng(0))
    assert pools[1] == ["d", "a", "c", "f", "b", "e"]
    # Logged once per process, not for every NaN.
    assert [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()] == [
        "a candidate's fitness is NaN (e.g. an overflow in float16); NaN ranks last"]


# Each damages a search state (its bytes, or its JSON object) and names what the error must say.
_DAMAGED_STATES = {
    "binary garbage": (lambda raw, state: b"\xff\xfe\x00\x81garbage", "cannot read search state"),
    "a JSON list": (lambda raw, state: b"[1, 2]", "not an EvoPress search state"),
    "no parent": (lambda raw, state: state.pop("parent"), "has no 'parent'"),
    "no context": (lambda raw, state: state.pop("context"), "has no 'context'"),
    "generation a string": (lambda raw, state: state.update(generation="2"), "'generation' is str '2', not int"),
    "negative generation": (lambda raw, state: state.update(generation=-1), "'generation' is -1"),
    "settings a list": (lambda raw, state: state.update(settings=[1]), "'settings' is list"),
    "parent of strings": (lambda raw, state: state.update(parent=["0"] * N), "'parent' is"),
    "fitness a string": (lambda raw, state: state.update(parent_fitness="x"), "'parent_fitness' is str 'x', not int"),
    "rng a string": (lambda raw, state: state.update(mutation_rng="abc"), "'mutation_rng' is str"),
    "rng of another generator": (lambda raw, state: state["mutation_rng"].update(bit_generator="MT19937"),
                                 "'mutation_rng' is not a PCG64 state"),
    "rng state a string": (lambda raw, state: state["data_rng"]["state"].update(state="x"),
                           "'data_rng' is not a PCG64 state"),
    "rng without a field": (lambda raw, state: state["data_rng"].pop("has_uint32"), "'data_rng' is not a PCG64"),
}


@pytest.mark.parametrize("damage", list(_DAMAGED_STATES))
def test_a_damaged_search_state_is_a_clear_value_error(tmp_path, damage):
    path = tmp_path / "state.json"
    evolutionary_search(space(), make_evaluate(), SearchSettings(**{**SETTINGS.__dict__, "generations": 2}),
                        checkpoint_path=str(path), progress=False)
    change, message = _DAMAGED_STATES[damage]
    state = json.loads(path.read_text())
    raw = change(path.read_bytes(), state)
    path.write_bytes(raw if isinstance(raw, bytes) else json.dumps(state).encode())
    with pytest.raises(ValueError, match="state.json") as error:
        evolutionary_search(space(), make_evaluate(), SETTINGS, resume_from=str(path), progress=False)
    assert message in str(error.value)
    assert type(error.value) is ValueError  # not a UnicodeDecodeError or another subclass


def test_small_space_yields_fewer_offspring_without_hanging():
    tiny = LevelSpace(units=["a", "b", "c"], levels=[(0, 1)] * 3, costs=[(0, 1)] * 3, budget=1)
    result = evolutionary_search(tiny, lambda cands, n, rng, reference: [float(sum(i * x for i, x in enumerate(c))) for c in cands],
                                 SearchSettings(generations=3, offspring=8, survivors_per_selection=(4, 1),
                                                tokens_per_selection=(1, 2)), progress=False)
    assert result.assignment == (1, 0, 0)


def test_generic_baselines():
    evaluate = make_evaluate()
    assert brute_force_search(space(), evaluate, 16, progress=False).assignment == optimum()
    ranked = one_at_a_time_search(space(), evaluate, 16).assignment
    assert ranked == tuple(int(i in np.argsort(WEIGHTS)[:K]) for i in range(N))
    assert space().is_valid(random_search(space(), seed=3).assignment)


def test_brute_force_and_ranking_keep_every_groups_budget_and_rank_falling_costs():
    grouped = LevelSpace(units=["a", "b", "c", "d"], levels=[(4, 2)] * 4, costs=[(8, 4)] * 2 + [(4, 2)] * 2,
                         budget=18, groups=[0, 0, 1, 1], group_budgets=[12, 6])  # fewer bits at level 1
    # Compressing unit c of group 1 scores best, but only group 0 has budget to give.
    other = LevelSpace(units=["a", "b", "c", "d"], levels=[(4, 2)] * 4, costs=[(4, 2)] * 4, budget=14,
                       groups=[0, 0, 1, 1], group_budgets=[6, 8])
    every = brute_force_search(other, lambda cands, n, rng, ref: [-float(c[2]) - 0.1 * c[0] for c in cands], 1,
                               progress=False)
    assert every.assignment == (1, 0, 0, 0)
    scores = [0.3, 0.1, 0.2, 0.4]  # unit b, then c are the least harmful to compress
    ranked = one_at_a_time_search(grouped, lambda cands, n, rng, ref: [scores[c.index(1)] for c in cands], 1)
    assert ranked.assignment == (0, 1, 1, 0) and grouped.is_valid(ranked.assignment)


def test_random_search_keeps_the_best_of_its_candidates():
    log = []
    result = random_search(space(), seed=3, evaluate=make_evaluate(log=log), num_tokens=32, candidates=10)
    drawn = log[0][0]
    assert len(drawn) == 10 and log[0][1] == 32
    assert result.assignment == min(drawn, key=true_fitness)
    assert result.fitness == pytest.approx(true_fitness(result.assignment))


def _bits_space(grouped):
    # Six layers of sizes 1, 1, 2, 2, 3, 3 at 3.5 bits on average; grouped: each size pair averages 3.5 bits.
    sizes = (1, 1, 2, 2, 3, 3)
    levels = (8, 4, 3, 2)
    kwargs = dict(groups=(0, 0, 1, 1, 2, 2), group_budgets=(7, 14, 21)) if grouped else {}
    budget = 42
    return LevelSpace(units=[f"l{i}" for i in range(6)], levels=[levels] * 6,
                      costs=[tuple(b * s for b in levels) for s in sizes], budget=budget, **kwargs)


@pytest.mark.parametrize("grouped", [False, True])
def test_dynamic_programming_is_exact_for_additive_errors(grouped):
    space = _bits_space(grouped)
    rng = np.random.default_rng(5)
    errors = rng.uniform(0, 1, (6, 4)).cumsum(axis=1)  # error grows as bits shrink
    result = dynamic_programming_search(space, errors.tolist())
    assert space.is_valid(result.assignment)
    valid = [a for a in itertools.product(range(4), repeat=6) if space.is_valid(a)]
    best = min(valid, key=lambda a: sum(errors[u, lv] for u, lv in enumerate(a)))
    total = lambda a: sum(errors[u, lv] for u, lv in enumerate(a))  # noqa: E731
    assert total(result.assignment) == pytest.approx(total(best))
    with pytest.raises(ValueError, match="one value per unit"):
        dynamic_programming_search(space, errors[:5].tolist())


def test_seed_assignments_join_the_initial_pool():
    log = []
    best = optimum()
    settings = SearchSettings(generations=0, offspring=4, survivors_per_selection=(2, 1), tokens_per_selection=(8, 16),
                              initial_candidates=4, max_flips=3, seed=0)
    result = evolutionary_search(space(), make_evaluate(log=log), settings, progress=False, seeds=[best])
    assert best in log[0][0] and len(log[0][0]) == 4
    assert result.assignment == best
    with pytest.raises(ValueError, match="not valid at the budget"):
        evolutionary_search(space(), make_evaluate(), settings, progress=False, seeds=[(1,) * N])
