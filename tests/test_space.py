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


def grouped_space():
    # Two groups of equal-size layers (sizes 1 and 2) with bit-width levels; each group averages 3 bits.
    sizes = (1, 1, 1, 1, 2, 2, 2, 2)
    return LevelSpace(units=[f"l{i}" for i in range(8)], levels=[(8, 6, 4, 3, 2)] * 8,
                      costs=[tuple(b * s for b in (8, 6, 4, 3, 2)) for s in sizes], budget=12 + 24,
                      groups=(0, 0, 0, 0, 1, 1, 1, 1), group_budgets=(12, 24))


def test_groups_keep_their_own_budgets_under_mutation():
    space = grouped_space()
    assignment = space.feasible_assignment()
    assert space.is_valid(assignment) and assignment == (3,) * 8
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        assignment = level_switch_mutation(space, assignment, rng, flips=2)
        assert space.is_valid(assignment)
        assert sum(space.costs[u][assignment[u]] for u in range(4)) == 12
        seen.add(assignment)
    assert len(seen) > 30
    assert space.is_valid(space.random_assignment(rng))
    # Two small layers up one bit and one large layer down one bit: same total, but both group budgets broken.
    moved = (2, 2, 3, 3, 4, 3, 3, 3)
    assert space.cost(moved) == space.budget and not space.is_valid(moved)
    ungrouped = LevelSpace(space.units, space.levels, space.costs, space.budget)
    assert ungrouped.is_valid(moved)
    assert space.fingerprint() != ungrouped.fingerprint()


def test_group_settings_are_checked():
    base = grouped_space()
    with pytest.raises(ValueError, match="go together"):
        LevelSpace(base.units, base.levels, base.costs, base.budget, groups=base.groups)
    with pytest.raises(ValueError, match="sum to"):
        LevelSpace(base.units, base.levels, base.costs, base.budget, groups=base.groups, group_budgets=(12, 20))
    # Only 8 or 2 bits per layer: a group of four size-1 layers cannot total an odd 15 bits.
    two_levels = LevelSpace(base.units, [(8, 2)] * 8, [tuple(b * s for b in (8, 2)) for s in (1,) * 4 + (2,) * 4],
                            15 + 40, groups=base.groups, group_budgets=(15, 40))
    with pytest.raises(ValueError, match="cannot be met exactly"):
        two_levels.feasible_assignment()
