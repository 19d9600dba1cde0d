"""Periodic Model Stock during training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelstock.training import PeriodicModelStock


def make_runs(seed: int = 0) -> tuple[nn.Module, list[nn.Module], list[torch.optim.Optimizer]]:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    runs = []
    for _ in range(2):
        run = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        run.load_state_dict(base.state_dict())
        runs.append(run)
    optimizers = [torch.optim.SGD(r.parameters(), lr=0.1) for r in runs]
    return base, runs, optimizers


def train_step(run: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    inputs = torch.randn(16, 4, generator=generator)
    targets = inputs[:, :2] * 2 - inputs[:, 2:]
    loss = ((run(inputs) - targets) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def expected_model_stock(base: dict, states: list[dict]) -> dict:
    """Independent float64 Model Stock for N = 2: t = 2cos / (1 + cos)."""
    out = {}
    for name, w0 in base.items():
        w0 = w0.double()
        d1, d2 = (s[name].double() - w0 for s in states)
        cos = float((d1 * d2).sum() / (d1.norm() * d2.norm()))
        t = 2 * cos / (1 + cos)
        out[name] = t * (states[0][name].double() + states[1][name].double()) / 2 + (1 - t) * w0
    return out


def test_merges_every_k_ticks_and_continues_from_the_merge() -> None:
    base, runs, optimizers = make_runs()
    merger = PeriodicModelStock(base.state_dict(), every=3)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    for tick in range(1, 8):
        for run, optimizer, generator in zip(runs, optimizers, generators):
            train_step(run, optimizer, generator)
        before = [{k: v.clone() for k, v in r.state_dict().items()} for r in runs]
        event = merger.tick(runs)
        if tick % 3:
            assert event is None
            assert not torch.equal(runs[0][0].weight, runs[1][0].weight)
            continue
        assert event is not None and event.tick == tick and 0 < event.mean_t <= 1
        expected = expected_model_stock(base.state_dict(), before)
        for run in runs:
            for name, tensor in run.state_dict().items():
                torch.testing.assert_close(tensor.double(), expected[name], atol=1e-6, rtol=1e-5)
        assert all(torch.equal(merger.merged[k], runs[0].state_dict()[k]) for k in merger.merged)
    assert [e.tick for e in merger.events] == [3, 6]
    # The base it merges towards is a snapshot, not a live view of a model.
    with torch.no_grad():
        base[0].weight.add_(1.0)
    assert not torch.equal(merger.base["0.weight"], base[0].weight)


def test_training_keeps_improving_with_periodic_merges() -> None:
    base, runs, optimizers = make_runs(seed=1)
    merger = PeriodicModelStock(base.state_dict(), every=5)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    probe = torch.Generator().manual_seed(99)
    inputs = torch.randn(256, 4, generator=probe)
    targets = inputs[:, :2] * 2 - inputs[:, 2:]

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(((model(inputs) - targets) ** 2).mean())

    start = loss(runs[0])
    for _ in range(60):
        for run, optimizer, generator in zip(runs, optimizers, generators):
            train_step(run, optimizer, generator)
        merger.tick(runs)
    assert len(merger.events) == 12
    assert loss(runs[0]) < 0.5 * start


def test_rejects_bad_arguments() -> None:
    base, runs, _ = make_runs()
    with pytest.raises(ValueError):
        PeriodicModelStock(base.state_dict(), every=0)
    with pytest.raises(ValueError, match="two"):
        PeriodicModelStock(base.state_dict()).merge_now(runs[:1])
