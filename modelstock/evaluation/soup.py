"""The greedy soup rule (Wortsman et al., 2022, Recipe 1) as a pure function.

Ingredients are ordered by held-out score, best first; the soup starts from the best one and
each next ingredient is kept if the held-out score of the running average is not worse than the
best so far (``>=``, the paper's rule; ``strict=True`` gives the released code's ``>``). Scores
are accuracies (higher is better) or, for language models, perplexities
(``higher_is_better=False``: the same rule with the comparisons mirrored).
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
    higher_is_better: bool = True

    @property
    def score(self) -> float:
        kept = [step.score for step in self.steps if step.accepted]
        return max(kept) if self.higher_is_better else min(kept)


def greedy_soup(
    candidates: Sequence[T],
    held_out: Mapping[T, float],
    score_soup: Callable[[Sequence[T]], float],
    strict: bool = False,
    higher_is_better: bool = True,
) -> GreedySoupResult[T]:
    """Run the greedy rule. ``held_out[c]`` is each ingredient's own held-out score;
    ``score_soup(ingredients)`` returns the held-out score of their uniform average.

    Ties in individual scores keep the input order (a stable sort), so results are reproducible.
    """
    if not candidates:
        raise ValueError("greedy soup needs at least one ingredient")
    sign = 1.0 if higher_is_better else -1.0
    ordered = sorted(candidates, key=lambda c: -sign * held_out[c])
    best = ordered[0]
    accepted = [best]
    best_score = held_out[best]
    steps: list[GreedyStep[T]] = [GreedyStep(best, best_score, True, None)]
    for candidate in ordered[1:]:
        score = score_soup([*accepted, candidate])
        keep = sign * score > sign * best_score if strict else sign * score >= sign * best_score
        steps.append(GreedyStep(candidate, score, keep, best_score))
        if keep:
            accepted.append(candidate)
            best_score = score
    return GreedySoupResult(accepted=accepted, steps=steps, higher_is_better=higher_is_better)
