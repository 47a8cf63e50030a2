"""An optimizer wrapper under which nothing outside a mask can move (paper 5.3, done right).

The reference code's "sparse" fine-tuning zeroed the gradients outside the mask but used Adam
with coupled weight decay, so every weight moved. :class:`MaskedOptimizer` wraps any torch
optimizer and, after every step, writes back the pre-step value of every entry outside the mask:
whatever the wrapped optimizer does (momentum, weight decay), out-of-mask entries stay
bit-identical. Gradients outside the mask are also zeroed before the step, so the optimizer's
state for them stays at rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


class MaskedOptimizer:
    """Wrap ``optimizer`` so that only entries where ``masks[param]`` is True change.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        masks: boolean masks by parameter (same shape). Parameters of the optimizer without a
            mask are frozen entirely.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, masks: Mapping[torch.nn.Parameter, Tensor]
    ):
        self.optimizer = optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        known = {id(p) for p in params}
        self._masks: dict[int, Tensor] = {}
        for param, mask in masks.items():
            if id(param) not in known:
                raise ValueError("a masked parameter is not in the optimizer's param_groups")
            if mask.shape != param.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a boolean tensor of shape {tuple(param.shape)}, got "
                    f"{mask.dtype} {tuple(mask.shape)}"
                )
            self._masks[id(param)] = mask.to(param.device)
        self._params = params

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of the wrapped optimizer; out-of-mask entries are then restored exactly."""
        before = []
        for param in self._params:
            mask = self._masks.get(id(param))
            if param.grad is not None and mask is not None:
                param.grad.mul_(mask)
            elif param.grad is not None:
                param.grad.zero_()
            before.append(param.detach().clone())
        loss = self.optimizer.step(closure)
        for param, old in zip(self._params, before, strict=True):
            mask = self._masks.get(id(param))
            if mask is None:
                param.copy_(old)
            else:
                param.copy_(torch.where(mask, param, old))
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "masks": [self._masks.get(id(p)) for p in self._params],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if len(masks) != len(self._params):
            raise ValueError(
                f"state has masks for {len(masks)} parameters, expected {len(self._params)}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self._masks = {
            id(p): m.to(p.device) for p, m in zip(self._params, masks, strict=True) if m is not None
        }
