"""An optimizer wrapper under which nothing outside a mask can move (paper 5.3, done right).

The reference code's "sparse" fine-tuning zeroed the gradients outside the mask but used Adam
with coupled weight decay, so every weight moved. :class:`MaskedOptimizer` wraps any torch
optimizer and, after every step, writes back the pre-step value of every entry outside the mask:
whatever the wrapped optimizer does (momentum, weight decay), out-of-mask entries stay
bit-identical. Gradients outside the mask are also zeroed before the step, so the optimizer's
state for them stays at rest. The bookkeeping is three of torch's multi-tensor ``_foreach``
passes (as torch's own optimizers use) and one reusable buffer the size of the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

# torch's multi-tensor kernels, which its own optimizers use
_foreach_mul_ = torch._foreach_mul_  # pyright: ignore[reportPrivateImportUsage]
_foreach_copy_ = torch._foreach_copy_  # pyright: ignore[reportPrivateImportUsage]
_foreach_lerp_ = torch._foreach_lerp_  # pyright: ignore[reportPrivateImportUsage]


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
        self._before: list[Tensor] | None = None  # pre-step values, reused between steps
        self._float_masks: list[Tensor] | None = None
        self._float_keep: list[Tensor] | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of the wrapped optimizer; out-of-mask entries are then restored exactly."""
        params, weights = self._params, self._weights()
        with_grad = [
            (p.grad, w) for p, w in zip(params, weights, strict=True) if p.grad is not None
        ]
        if with_grad:
            grads, grad_weights = zip(*with_grad, strict=True)
            _foreach_mul_(list(grads), list(grad_weights))
        if self._before is None:
            self._before = [p.detach().clone() for p in params]
        else:
            _foreach_copy_(self._before, params)
        loss = self.optimizer.step(closure)
        # lerp(new, old, 1 - mask): exactly old where the mask is 0, exactly new where it is 1.
        _foreach_lerp_(params, self._before, self._keep_weights())
        return loss

    def _keep_weights(self) -> list[Tensor]:
        """Per parameter, 1 where the old value must be kept (outside the mask), else 0."""
        if self._float_keep is None:
            self._float_keep = [1 - w for w in self._weights()]
        return self._float_keep

    def _weights(self) -> list[Tensor]:
        """Per parameter, the mask as 0/1 in the parameter's dtype (all zeros: frozen)."""
        if self._float_masks is None:
            self._float_masks = [
                self._masks[id(p)].to(p.dtype) if id(p) in self._masks else torch.zeros_like(p)
                for p in self._params
            ]
        return self._float_masks

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
        self._float_masks = None
        self._float_keep = None
