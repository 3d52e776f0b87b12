"""The model-agnostic search: level spaces, the evolutionary algorithm and generic baselines."""

from .baselines import (brute_force_search, dynamic_programming_search, one_at_a_time_search, random_search,
                        rank_to_assignment)
from .evolution import SearchResult, SearchSettings, check_search_state, evolutionary_search, multi_step_selection
from .space import Assignment, LevelSpace, level_switch_mutation

__all__ = [
    "Assignment",
    "LevelSpace",
    "SearchResult",
    "SearchSettings",
    "brute_force_search",
    "check_search_state",
    "dynamic_programming_search",
    "evolutionary_search",
    "level_switch_mutation",
    "multi_step_selection",
    "one_at_a_time_search",
    "random_search",
    "rank_to_assignment",
]
