"""Which request gets which fault: deterministic choices from the configured rules."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .config import FaultRule


@dataclass(frozen=True)
class RequestFacts:
    """What a fault rule can match on."""

    method: str
    key: str | None
    returns_object_bytes: bool


class FaultInjector:
    """Applies the rules in order; the first rule that fires takes the request.

    Each rule counts the requests it matched since it was configured, and draws from its own
    generator seeded with (seed, rule index), so the same request sequence gets the same
    faults on every run.
    """

    def __init__(self, rules: tuple[FaultRule, ...], seed: int) -> None:
        self._rules = rules
        self._matched = [0] * len(rules)
        self._injected = [0] * len(rules)
        self._generators = [random.Random(f"{seed}:{index}") for index in range(len(rules))]

    def pick(self, request: RequestFacts) -> FaultRule | None:
        for index, rule in enumerate(self._rules):
            if not _matches(rule, request):
                continue
            self._matched[index] += 1
            if rule.max_count is not None and self._injected[index] >= rule.max_count:
                continue
            if self._fires(index, rule):
                self._injected[index] += 1
                return rule
        return None

    def _fires(self, index: int, rule: FaultRule) -> bool:
        if rule.every_nth is not None:
            return self._matched[index] % rule.every_nth == 0
        assert rule.probability is not None
        return self._generators[index].random() < rule.probability


def _matches(rule: FaultRule, request: RequestFacts) -> bool:
    if rule.methods and request.method not in rule.methods:
        return False
    if rule.key_contains is not None and (request.key is None or rule.key_contains not in request.key):
        return False
    return request.returns_object_bytes or not rule.kind.needs_body
