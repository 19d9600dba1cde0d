"""The greedy soup rule (Wortsman et al., 2022, Recipe 1) as a pure function.

Ingredients are ordered by held-out accuracy, best first; the soup starts from the best one and
each next ingredient is kept if the held-out accuracy of the running average is not lower than
the best so far (``>=``, the paper's rule; ``strict=True`` gives the released code's ``>``).
Scoring is a callback so the same rule runs on toy numbers in tests and on the Ray evaluator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class GreedyStep(Generic[T]):
    """One step: the candidate tried, the held-out score of the soup with it, and the decision."""

    candidate: T
    score: float
    accepted: bool
    best_before: float | None


@dataclass(frozen=True)
class GreedySoupResult(Generic[T]):
    accepted: list[T]
    steps: list[GreedyStep[T]]

    @property
    def score(self) -> float:
        return max(step.score for step in self.steps if step.accepted)


def greedy_soup(
    candidates: Sequence[T],
    held_out: Mapping[T, float],
    score_soup: Callable[[Sequence[T]], float],
    strict: bool = False,
) -> GreedySoupResult[T]:
    """Run the greedy rule. ``held_out[c]`` is each ingredient's own held-out accuracy;
    ``score_soup(ingredients)`` returns the held-out accuracy of their uniform average.

    Ties in individual accuracy keep the input order (a stable sort), so results are reproducible.
    """
    if not candidates:
        raise ValueError("greedy soup needs at least one ingredient")
    ordered = sorted(candidates, key=lambda c: -held_out[c])
    best = ordered[0]
    accepted = [best]
    best_score = held_out[best]
    steps: list[GreedyStep[T]] = [GreedyStep(best, best_score, True, None)]
    for candidate in ordered[1:]:
        score = score_soup([*accepted, candidate])
        keep = score > best_score if strict else score >= best_score
        steps.append(GreedyStep(candidate, score, keep, best_score))
        if keep:
            accepted.append(candidate)
            best_score = score
    return GreedySoupResult(accepted=accepted, steps=steps)
