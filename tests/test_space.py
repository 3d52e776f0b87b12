import numpy as np
import pytest

from optimum_evopress.search import LevelSpace, level_switch_mutation


def depth_space(n=10, k=3):
    return LevelSpace(units=[f"u{i}" for i in range(n)], levels=[("kept", "dropped")] * n, costs=[(0, 1)] * n,
                      budget=k)


def test_mutation_keeps_the_budget_exactly_over_many_steps():
    # Units of two sizes with several levels: only switches with equal cost steps are allowed.
    space = LevelSpace(units=[f"u{i}" for i in range(8)], levels=[(2, 3, 4, 8)] * 8,
                       costs=[(2 * s, 3 * s, 4 * s, 8 * s) for s in (1, 1, 1, 1, 5, 5, 5, 5)], budget=3 * 4 + 15 * 4)
    rng = np.random.default_rng(0)
    assignment = space.feasible_assignment()
    assert space.is_valid(assignment)
    seen = set()
    for _ in range(500):
        assignment = level_switch_mutation(space, assignment, rng, flips=int(rng.integers(1, 4)))
        assert space.cost(assignment) == space.budget
        seen.add(assignment)
    assert len(seen) > 50


def test_random_assignments_are_valid_and_spread():
    space = depth_space(12, 4)
    rng = np.random.default_rng(1)
    samples = [space.random_assignment(rng) for _ in range(300)]
    assert all(space.is_valid(s) for s in samples)
    frequency = np.mean(samples, axis=0)
    assert frequency.min() > 0.2 and frequency.max() < 0.5  # every unit dropped about 4/12 of the time


def test_named_round_trip_and_errors():
    space = depth_space(4, 1)
    assignment = (0, 1, 0, 0)
    assert space.named(assignment) == {"u0": "kept", "u1": "dropped", "u2": "kept", "u3": "kept"}
    assert space.from_named(space.named(assignment)) == assignment
    with pytest.raises(ValueError, match="level"):
        space.from_named({"u0": "kept", "u1": "half", "u2": "kept", "u3": "kept"})
    with pytest.raises(ValueError, match="missing"):
        space.from_named({"u0": "kept"})


def test_unreachable_budgets_are_rejected():
    with pytest.raises(ValueError, match="reachable"):
        depth_space(4, 5)
    space = LevelSpace(units=["a", "b"], levels=[(0, 1)] * 2, costs=[(0, 2), (0, 2)], budget=3)
    with pytest.raises(ValueError, match="exactly"):
        space.feasible_assignment()


def test_fingerprint_changes_with_the_space():
    assert depth_space(6, 2).fingerprint() == depth_space(6, 2).fingerprint()
    assert depth_space(6, 2).fingerprint() != depth_space(6, 3).fingerprint()
