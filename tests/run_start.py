"""The weights a training run starts from: a copy of its towers taken at its first optimiser
step, before the step moves them (after ``init_from``, ``freeze`` and any other set-up)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import training.train
from model.objectives import OnlineModel, build_objective


class RunStarts:
    """While installed, ``weights[n]`` is the towers' state dict of the n-th run started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self._online: OnlineModel | None = None
        step = torch.optim.AdamW.step

        def first_step(optimizer: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
            if self._online is not None:  # the first step of this run: copy, then step
                state = self._online.towers.state_dict()
                self.weights.append({k: v.detach().clone() for k, v in state.items()})
                self._online = None
            return step(optimizer, *args, **kwargs)

        def objective(online: OnlineModel, *args: Any, **kwargs: Any) -> torch.nn.Module:
            self._online = online  # the trainer's model, handed to its objective once per run
            return build_objective(online, *args, **kwargs)

        monkeypatch.setattr(training.train, "build_objective", objective)
        monkeypatch.setattr(torch.optim.AdamW, "step", first_step)
