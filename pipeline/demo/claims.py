"""The papers' claims, checked on a demo's results table.

Model Stock (Jang et al., 2024): merging two fine-tunes with the pretrained model is at least as
good as either fine-tune, in and out of distribution. Model soups (Wortsman et al., 2022): the
uniform soup beats the best single fine-tune out of distribution; the greedy soup is at least as
good as the best single fine-tune on the held-out set it selects on (true by construction) and
usually in and out of distribution too. "At least as good" follows each column's direction:
higher accuracy, lower perplexity. Each claim is computed from the table, never assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from modelstock.evaluation.tables import SummaryColumn


class SummaryTable(Protocol):
    def summary_columns(self) -> list[SummaryColumn]: ...


@dataclass(frozen=True)
class Claim:
    statement: str
    holds: bool

    def line(self) -> str:
        return f"  {self.statement}: {'yes' if self.holds else 'no'}"


@dataclass(frozen=True)
class DemoModels:
    """The table's names for the models the claims compare."""

    finetunes: Sequence[str]
    pair: Sequence[str]  # the two fine-tunes Model Stock (2) merges
    model_stock_2: str
    uniform_soup: str
    greedy_soup: str


def _direction(column: SummaryColumn) -> str:
    return f"{column.name} ({'higher' if column.higher_is_better else 'lower'} is better)"


def paper_claims(table: SummaryTable, models: DemoModels) -> list[Claim]:
    claims: list[Claim] = []
    for column in table.summary_columns():
        values, good = column.values, column.at_least_as_good
        best = column.best(list(models.finetunes))
        on = _direction(column)
        held_out = column.name.startswith("held-out")
        if not held_out:
            claims.append(Claim(f"Model Stock (2) at least as good as each of its ingredients on {on}",
                                all(good(values[models.model_stock_2], values[m]) for m in models.pair)))
            claims.append(Claim(f"uniform soup at least as good as the best single fine-tune ({best}) on {on}",
                                good(values[models.uniform_soup], values[best])))
        claims.append(Claim(f"greedy soup at least as good as the best single fine-tune ({best}) on {on}",
                            good(values[models.greedy_soup], values[best])))
    return claims


def format_claims(claims: Sequence[Claim]) -> str:
    held = sum(claim.holds for claim in claims)
    return "\n".join([f"the papers' claims on this run ({held} of {len(claims)} hold):", *(c.line() for c in claims)])
