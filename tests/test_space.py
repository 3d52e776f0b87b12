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


BITS = (2, 3, 4, 5, 6, 8)  # the default quantization levels: the 6 -> 8 step is two bits, the others one


def bits_space(n=20, target=4, levels=BITS):
    return LevelSpace(units=[f"l{i}" for i in range(n)], levels=[levels] * n, costs=[levels] * n, budget=target * n)


def test_uneven_steps_reach_every_level_and_change_the_count_at_8_bits():
    space = bits_space()
    assert not space.regular
    rng = np.random.default_rng(0)
    seen_levels, raised, lowered = set(), False, False
    for _ in range(20):
        assignment = space.random_assignment(rng)
        assert space.is_valid(assignment)
        for _ in range(50):
            child = level_switch_mutation(space, assignment, rng, flips=int(rng.integers(1, 4)))
            assert space.is_valid(child)
            at_8 = child.count(BITS.index(8)) - assignment.count(BITS.index(8))
            raised, lowered = raised or at_8 > 0, lowered or at_8 < 0
            seen_levels.update(child)
            assignment = child
    assert seen_levels == set(range(len(BITS)))
    assert raised and lowered


def test_uneven_steps_move_at_a_target_that_is_a_level():
    # Quantization's order (8 bits first), every unit at 6 bits: 6 -> 5 has no one-bit partner,
    # but 6 -> 8 pairs with 6 -> 4.
    levels = tuple(sorted(BITS, reverse=True))
    space = bits_space(target=6, levels=levels)
    parent = (levels.index(6),) * 20
    assert space.feasible_assignment() == parent
    rng = np.random.default_rng(0)
    children = {level_switch_mutation(space, parent, rng, flips=1) for _ in range(20)}
    assert parent not in children and all(space.is_valid(child) for child in children)
    assert any(levels[lv] == 8 for child in children for lv in child)


def test_exact_search_meets_budgets_the_greedy_misses():
    # 13 bits over two units: the greedy reaches 6 + 6 and cannot add one more bit; 5 + 8 meets it.
    space = LevelSpace(["a", "b"], [BITS] * 2, [BITS] * 2, budget=13)
    assignment = space.feasible_assignment()
    assert space.is_valid(assignment) and sorted(BITS[lv] for lv in assignment) == [5, 8]
    # Grouped, in quantization's order: three units of size 2 averaging 7 bits need 5 + 8 + 8.
    levels = tuple(sorted(BITS, reverse=True))
    grouped = LevelSpace([f"l{i}" for i in range(5)], [levels] * 5, [tuple(2 * b for b in levels)] * 3 + [levels] * 2,
                         budget=42 + 8, groups=(0, 0, 0, 1, 1), group_budgets=(42, 8))
    assignment = grouped.feasible_assignment()
    assert grouped.is_valid(assignment) and assignment == grouped.feasible_assignment()
    assert sorted(levels[lv] for lv in assignment[:3]) == [5, 8, 8]
    # 15 bits over two units is not reachable (8 + 7 is not a pair of levels): still an error.
    with pytest.raises(ValueError, match="cannot be met exactly"):
        LevelSpace(["a", "b"], [BITS] * 2, [BITS] * 2, budget=15).feasible_assignment()


def test_regular_spaces_mutate_as_before():
    # Sequences recorded with the mutation as it was before uneven steps were handled: regular spaces (depth,
    # sparsity, evenly spaced bits, grouped or not) must keep making exactly the same draws and switches.
    sizes, bits = (1, 1, 1, 2, 2, 2), (6, 5, 4, 3, 2)
    grouped = LevelSpace([f"l{i}" for i in range(6)], [bits] * 6, [tuple(b * s for b in bits) for s in sizes],
                         budget=12 + 24, groups=(0, 0, 0, 1, 1, 1), group_budgets=(12, 24))
    spaces = {
        "depth": LevelSpace([f"u{i}" for i in range(8)], [("kept", "dropped")] * 8, [(0, 1)] * 8, budget=3),
        "grouped": grouped,
        "mixed": LevelSpace(grouped.units, grouped.levels, grouped.costs, grouped.budget),
        "sparse": LevelSpace([f"s{i}" for i in range(5)], [(0, 1, 2, 3)] * 4 + [(0, 1)],
                             [(10, 13, 16, 19)] * 4 + [(7, 10)], budget=10 * 4 + 7 + 6),
    }
    bits_chain = [(4, 1, 1, 3, 0, 3), (4, 1, 1, 2, 1, 3), (3, 0, 3, 2, 1, 3), (3, 0, 3, 1, 1, 4), (3, 1, 2, 1, 1, 4),
                  (3, 0, 3, 1, 2, 3)]
    expected = {
        "depth": [(0, 1, 0, 0, 1, 0, 0, 1), (0, 1, 0, 1, 1, 0, 0, 0), (0, 0, 0, 1, 1, 0, 1, 0),
                  (0, 0, 0, 1, 0, 1, 1, 0), (1, 0, 0, 1, 0, 1, 0, 0), (1, 0, 0, 0, 0, 0, 1, 1)],
        "grouped": bits_chain,
        "mixed": bits_chain,
        "sparse": [(1, 0, 0, 0, 1), (2, 0, 0, 0, 0), (0, 0, 0, 2, 0), (0, 1, 1, 0, 0), (0, 1, 0, 0, 1),
                   (1, 0, 0, 0, 1)],
    }
    for name, space in spaces.items():
        assert space.regular, name
        rng = np.random.default_rng(7)
        chain = [space.random_assignment(rng)]
        for flips in (1, 2, 3, 1, 2):
            chain.append(level_switch_mutation(space, chain[-1], rng, flips=flips))
        assert chain == expected[name], name
