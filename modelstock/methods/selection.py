"""Exact top-k selection over a whole tensor, within the memory budget: no full-tensor sort.

Entries are ranked by a non-negative float32 score (e.g. a task vector's magnitude), largest
first, equal scores by position (row-major), as a stable sort would: ``equal="first"`` ranks the
lower index first (a stable descending sort), ``equal="last"`` the higher one (the reverse of a
stable ascending sort, which mergekit's ``breadcrumbs`` ranks by). A *cutoff* k keeps the
entries of rank < k. Three passes over the engine's fixed blocks find, for every cutoff, the
exact score threshold and how many entries equal to it are kept:

1. count the scores by the high 16 bits of their float32 bit pattern (an order-preserving key
   for non-negative floats) and find the bin holding the k-th largest;
2. within that bin, count by the low 16 bits: the threshold score, and how many entries above it;
3. count, per row, the entries equal to the threshold, so the blend knows how many precede each.

A method declares a :class:`Selection` (its scores and cutoffs), adds ``selection.reductions``
before its own, and calls ``selection.top(...)`` in its blend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from modelstock.methods.base import (
    AppliesFn,
    Coefficients,
    Finalized,
    ModelsBlock,
    Reduction,
    ReductionScope,
    TensorParameters,
    always,
)

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
LOW_MASK = BINS - 1

# (S, rows, cols) float32 scores >= 0 of one block: one set of scores per selection.
ScoreFn = Callable[[ModelsBlock, TensorParameters[Any, Any], torch.dtype], torch.Tensor]
# Rank cutoffs per selection (the same number for every selection), given the element count and
# the coefficients of the method's earlier passes.
CutoffFn = Callable[[TensorParameters[Any, Any], int, Coefficients], Sequence[Sequence[int]]]


def _rows_scope(params: TensorParameters[Any, Any], shape: tuple[int, ...]) -> ReductionScope:
    return "rows"


def score_bits(scores: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of non-negative float32 scores: ordered as the scores are."""
    return scores.to(torch.float32).contiguous().view(torch.int32)


def _first_bin_reaching(counts: torch.Tensor, above: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``counts`` (bins in ascending key order), the highest bin b with
    ``above + count(bins > b) < wanted <= above + count(bins >= b)``, and ``above + count(bins > b)``."""
    strictly_above = counts.flip(-1).cumsum(-1).flip(-1) - counts  # entries in higher bins
    reached = (above.unsqueeze(-1) + strictly_above + counts) >= wanted.unsqueeze(-1)
    # The highest bin that reaches the cutoff: the last True in ascending order.
    index = torch.arange(counts.shape[-1]).expand_as(counts)
    chosen = torch.where(reached, index, -1).amax(dim=-1).clamp_min(0)
    return chosen, above + strictly_above.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class Selection:
    """Top-k sets by score: ``score`` gives S scores per entry, ``cutoffs`` C rank cutoffs each."""

    prefix: str
    score: ScoreFn
    cutoffs: CutoffFn
    applies: AppliesFn = always
    # Which of equal scores ranks first: the lower index ("first") or the higher ("last").
    equal: Literal["first", "last"] = "first"

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def _cutoffs(self, params: TensorParameters[Any, Any], numel: int, coefficients: Coefficients) -> torch.Tensor:
        cutoffs = torch.tensor([list(c) for c in self.cutoffs(params, numel, coefficients)], dtype=torch.int64)
        return cutoffs.clamp(0, numel)

    # --- pass 1: high digit ----------------------------------------------------------------

    def _count_high(self, block: ModelsBlock, coefficients: Coefficients, params: TensorParameters[Any, Any],
                    compute: torch.dtype) -> torch.Tensor:
        high = score_bits(self.score(block, params, compute)) >> DIGIT_BITS
        return torch.stack([torch.bincount(h.reshape(-1), minlength=BINS) for h in high]).reshape(1, -1)

    def _finalize_high(self, reductions: torch.Tensor, coefficients: Coefficients, params: TensorParameters[Any, Any],
                       count: int) -> Finalized:
        counts = reductions.reshape(-1, BINS)  # (S, BINS)
        numel = int(counts[0].sum())
        cutoffs = self._cutoffs(params, numel, coefficients)  # (S, C)
        per_cutoff = counts.unsqueeze(1).expand(-1, cutoffs.shape[1], -1)
        high, above = _first_bin_reaching(per_cutoff, torch.zeros_like(cutoffs), cutoffs)
        return Finalized(
            coefficients={self.key("cutoff"): cutoffs, self.key("high"): high, self.key("above_high"): above},
            values={}, flags=[],
        )

    # --- pass 2: low digit within the chosen high bin -------------------------------------

    def _count_low(self, block: ModelsBlock, coefficients: Coefficients, params: TensorParameters[Any, Any],
                   compute: torch.dtype) -> torch.Tensor:
        bits = score_bits(self.score(block, params, compute))
        high = coefficients[self.key("high")]
        counts = []
        for s in range(high.shape[0]):
            selection_bits = bits[s].reshape(-1)
            for c in range(high.shape[1]):
                in_bin = selection_bits[(selection_bits >> DIGIT_BITS) == high[s, c]]
                counts.append(torch.bincount(in_bin & LOW_MASK, minlength=BINS))
        return torch.stack(counts).reshape(1, -1)

    def _finalize_low(self, reductions: torch.Tensor, coefficients: Coefficients, params: TensorParameters[Any, Any],
                      count: int) -> Finalized:
        cutoffs, high, above_high = (coefficients[self.key(k)] for k in ("cutoff", "high", "above_high"))
        counts = reductions.reshape(*cutoffs.shape, BINS)
        low, above = _first_bin_reaching(counts, above_high, cutoffs)
        threshold = (high << DIGIT_BITS) | low
        # A cutoff of 0 keeps nothing: a threshold above every finite score's bits.
        threshold = torch.where(cutoffs == 0, torch.iinfo(torch.int32).max, threshold)
        above = torch.where(cutoffs == 0, 0, above)
        return Finalized(
            coefficients={self.key("threshold"): threshold.to(torch.int32), self.key("keep_equal"): cutoffs - above},
            values={}, flags=[],
        )

    # --- pass 3: entries equal to each threshold, per row ---------------------------------

    def _count_equal(self, block: ModelsBlock, coefficients: Coefficients, params: TensorParameters[Any, Any],
                     compute: torch.dtype) -> torch.Tensor:
        bits = score_bits(self.score(block, params, compute))  # (S, rows, cols)
        threshold = coefficients[self.key("threshold")]  # (S, C)
        equal = bits.unsqueeze(1) == threshold[:, :, None, None]  # (S, C, rows, cols)
        return equal.sum(dim=-1).reshape(-1, bits.shape[1]).T  # (rows, S * C)

    def _finalize_equal(self, reductions: torch.Tensor, coefficients: Coefficients, params: TensorParameters[Any, Any],
                        count: int) -> Finalized:
        before = reductions.cumsum(dim=0) - reductions  # equal entries in earlier rows
        total = reductions.sum(dim=0)  # equal entries in the tensor, per (selection, cutoff)
        return Finalized(coefficients={self.key("equal_before"): before, self.key("equal_total"): total}, values={}, flags=[],
                         per_row=frozenset({self.key("equal_before")}))

    @property
    def reductions(self) -> tuple[Reduction, Reduction, Reduction]:
        return (
            Reduction(self._count_high, self._finalize_high, applies=self.applies),
            Reduction(self._count_low, self._finalize_low, applies=self.applies),
            Reduction(self._count_equal, self._finalize_equal, _rows_scope, applies=self.applies),
        )

    def top(self, scores: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
        """(S, C, rows, cols): whether each entry's rank is below each cutoff, for one block whose
        ``scores`` (S, rows, cols) the method computed as in ``score``."""
        bits = score_bits(scores).unsqueeze(1)  # (S, 1, rows, cols)
        threshold = coefficients[self.key("threshold")][:, :, None, None]
        keep_equal = coefficients[self.key("keep_equal")][:, :, None, None]
        equal = bits == threshold
        rows = bits.shape[2]
        before = coefficients[self.key("equal_before")].T.reshape(*threshold.shape[:2], rows, 1)
        rank_among_equal = before + equal.cumsum(dim=-1) - 1
        if self.equal == "last":  # counted from the end: the equal entries after this one
            total = coefficients[self.key("equal_total")].reshape(*threshold.shape[:2], 1, 1)
            rank_among_equal = total - 1 - rank_among_equal
        return (bits > threshold) | (equal & (rank_among_equal < keep_equal))

    # --- order statistics: the scores at given ranks, without the per-row tie pass ------------

    @property
    def value_reductions(self) -> tuple[Reduction, Reduction]:
        """The two passes that find each cutoff's threshold score (enough for :meth:`values`)."""
        return self.reductions[0], self.reductions[1]

    def values(self, coefficients: Coefficients) -> torch.Tensor:
        """(S, C) float32: the score of rank ``cutoff - 1`` (largest first) for each cutoff >= 1."""
        return coefficients[self.key("threshold")].to(torch.int32).view(torch.float32)
