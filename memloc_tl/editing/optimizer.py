"""An optimizer wrapper under which nothing outside a mask can move (paper 5.3, done right).

The reference code's "sparse" fine-tuning zeroed the gradients outside the mask but used Adam
with coupled weight decay, so every weight moved. :class:`MaskedOptimizer` wraps a torch
optimizer so that out-of-mask entries stay bit-identical, whatever it does (momentum, weight
decay), in one of two ways:

- ``"compact"``: for optimizers that treat every entry on its own (SGD, Adam, AdamW, RMSprop,
  ...), the optimizer runs on the masked entries only, gathered into one small tensor per
  parameter; the result is scattered back. Out-of-mask entries are never written, and a step
  costs in proportion to the mask (0.1% of the weights), not to the model.
- ``"restore"``: for any optimizer (also ones that mix entries, such as L-BFGS), the wrapped
  optimizer steps on the full parameters (out-of-mask gradients zeroed) and the pre-step value
  of every out-of-mask entry is selected back (``torch.where``, so even a NaN or Inf step
  outside the mask leaves it bit-identical), with one reusable buffer the size of the
  parameters.

``"auto"`` (the default) picks compact for the elementwise optimizers of ``torch.optim`` when the
masks select under half of the entries, restore otherwise.

In compact mode, :meth:`MaskedOptimizer.gathering_gradients` also keeps the gradients compact:
inside it, each parameter's gradient is reduced to its masked entries as soon as the backward
pass has produced it, so a backward pass holds one full gradient matrix at a time, not every
trained matrix's.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from memloc_tl.core.objectives import gradients_as_produced
from memloc_tl.core.selection import (
    check_selection,
    selected_count,
    selected_indices,
    selected_mask,
)

# torch's multi-tensor kernels, which its own optimizers use
_foreach_copy_ = torch._foreach_copy_  # pyright: ignore[reportPrivateImportUsage]

ELEMENTWISE = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Rprop,
)
"""torch optimizers whose update of an entry depends on that entry alone (compact mode is exact)."""

Mode = Literal["auto", "compact", "restore"]


class MaskedOptimizer:
    """Wrap ``optimizer`` so that only the entries ``masks[param]`` selects change.

    Args:
        optimizer: a ``torch.optim.Optimizer`` over the parameters (not stepped yet, for
            compact mode, which builds the same optimizer over the masked entries).
        masks: by parameter, the entries that may change: a boolean mask of its shape, or
            the sorted, distinct int64 flat indices of those entries (a selection,
            :mod:`memloc_tl.core.selection`; indices keep a 0.1% mask at 0.8% of the booleans'
            memory). Parameters of the optimizer without a mask are frozen entirely.
        mode: ``"compact"``, ``"restore"`` or ``"auto"`` (see the module docs).

    Attributes:
        optimizer: the optimizer that steps: the given one (restore) or its compact copy.
        mode: the mode in use.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        masks: Mapping[torch.nn.Parameter, Tensor],
        *,
        mode: Mode = "auto",
    ):
        if mode not in ("auto", "compact", "restore"):
            raise ValueError(f"mode must be 'auto', 'compact' or 'restore', got {mode!r}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        known = {id(p) for p in params}
        self._masks: dict[int, Tensor] = {}  # selections, as given
        for param, mask in masks.items():
            if id(param) not in known:
                raise ValueError("a masked parameter is not in the optimizer's param_groups")
            try:
                check_selection(mask, param.shape, f"a parameter of shape {tuple(param.shape)}")
            except TypeError as error:  # a wrong dtype: a wrong value for this argument
                raise ValueError(str(error)) from None
            self._masks[id(param)] = mask.to(param.device)
        self._params = params
        self._before: list[Tensor] | None = None  # pre-step values, reused between steps
        # compact gradients gathered during backward passes (gathering_gradients), by param id
        self._gathered: dict[int, Tensor] = {}
        self._keep_masks: list[Tensor] | None = None  # of the parameters restored
        self._restored: list[bool] = []
        if mode == "auto":
            selected = sum(selected_count(m) for m in self._masks.values())
            sparse = selected < 0.5 * max(1, sum(p.numel() for p in params))
            mode = "compact" if type(optimizer) in ELEMENTWISE and sparse else "restore"
        if mode == "compact":
            optimizer = self._compact_copy(optimizer)
        self.mode: Literal["compact", "restore"] = mode
        self.optimizer = optimizer

    def _compact_copy(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The same optimizer and hyperparameters over the masked entries of each parameter."""
        if type(optimizer) not in ELEMENTWISE:
            raise ValueError(
                f"compact mode needs an optimizer that updates each entry on its own "
                f"({', '.join(c.__name__ for c in ELEMENTWISE)}); got "
                f"{type(optimizer).__name__}: use mode='restore'"
            )
        if optimizer.state:
            raise ValueError("compact mode needs an optimizer that has not stepped yet")
        # per masked parameter: flat indices of its selected entries and their compact values
        self._compact: list[tuple[Tensor, Tensor, Tensor]] = []
        groups = []
        for group in optimizer.param_groups:
            compact_params = []
            for param in group["params"]:
                mask = self._masks.get(id(param))
                if mask is None or not selected_count(mask):
                    continue
                if not param.is_contiguous():
                    raise ValueError("compact mode needs contiguous parameters")
                index = selected_indices(mask)
                values = param.detach().flatten().index_select(0, index).clone()
                self._compact.append((param, index, values))
                compact_params.append(values)
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({"params": compact_params, **settings})
        # every setting travels in the groups; the constructor gets those it accepts
        accepted = inspect.signature(type(optimizer).__init__).parameters
        settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        return type(optimizer)(groups, **settings)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @contextlib.contextmanager
    def gathering_gradients(self) -> Iterator[None]:
        """Inside the block, backward passes leave only the masked entries' gradients.

        As soon as a backward pass has accumulated a parameter's gradient, its masked entries
        are added to a compact gradient the next :meth:`step` uses, and the parameter's
        ``.grad`` is dropped (also for parameters of the optimizer without a mask, which are
        frozen anyway). A backward pass then holds one full gradient matrix at a time instead
        of all of them. The gradients are the same (summed over backward passes, cleared by
        :meth:`zero_grad`); a ``.grad`` present before the block still counts at the next
        step. Compact mode only; enter the block once the parameters require grad (it hooks
        those that do). The hooks are removed on exit, also after an error.

        Raises:
            ValueError: restore mode, which steps on full gradients.
        """
        if self.mode != "compact":
            raise ValueError(
                "gathering_gradients needs compact mode (restore mode steps on full gradients)"
            )
        index_of = {id(param): index for param, index, _ in self._compact}

        def gather(param: torch.nn.Parameter, grad: Tensor) -> None:
            index = index_of.get(id(param))
            if index is None:  # no mask: frozen, its gradient is dropped
                return
            entries = grad.flatten().index_select(0, index)
            total = self._gathered.get(id(param))
            self._gathered[id(param)] = entries if total is None else total.add_(entries)

        with gradients_as_produced(self._params, gather):
            yield

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._gathered.clear()
        for param in self._params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of the wrapped optimizer; out-of-mask entries are left exactly as they were."""
        if self.mode == "compact":
            return self._compact_step(closure)
        return self._restore_step(closure)

    def _gather(self) -> None:
        for param, index, values in self._compact:
            values.copy_(param.detach().flatten().index_select(0, index))
            grad = None if param.grad is None else param.grad.flatten().index_select(0, index)
            gathered = self._gathered.get(id(param))
            if gathered is not None:
                grad = gathered.clone() if grad is None else grad.add_(gathered)
            values.grad = grad

    def _compact_step(self, closure: Callable[[], float] | None) -> float | None:
        if closure is None:
            self._gather()
            loss = self.optimizer.step()
        else:

            def compact_closure() -> float:
                with torch.enable_grad():
                    value = closure()
                self._gather()
                return value

            loss = self.optimizer.step(compact_closure)
        for param, index, values in self._compact:
            param.detach().view(-1).index_copy_(0, index, values)
        return loss

    def _restore_step(self, closure: Callable[[], float] | None) -> float | None:
        # Only parameters with entries to keep are saved and restored: one whose mask selects
        # every entry (e.g. a mask of all weights) steps as the wrapped optimizer steps it.
        params, keep = self._restore_list()
        # Out-of-mask gradients become exactly 0 (masked_fill, not a product: NaN * 0 is NaN).
        for param, frozen in zip(params, keep, strict=True):
            if param.grad is not None:
                param.grad.masked_fill_(frozen, 0)
        if self._before is None:
            self._before = [p.detach().clone() for p in params]
        elif params:
            _foreach_copy_(self._before, params)
        loss = self.optimizer.step(closure)
        # A select, not arithmetic: the old value comes back bit for bit, even where the
        # optimizer wrote NaN or Inf.
        for param, before, frozen in zip(params, self._before, keep, strict=True):
            torch.where(frozen, before, param.detach(), out=param.detach())
        return loss

    def _restore_list(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters with entries outside the mask, and per parameter where (True)."""
        if self._keep_masks is None:
            self._keep_masks = [
                ~selected_mask(self._masks[id(p)], p.shape)
                if id(p) in self._masks
                else torch.ones_like(p, dtype=torch.bool)
                for p in self._params
            ]
            self._restored = [bool(k.any()) for k in self._keep_masks]
            self._keep_masks = [
                k for k, r in zip(self._keep_masks, self._restored, strict=True) if r
            ]
        params = [p for p, r in zip(self._params, self._restored, strict=True) if r]
        return params, self._keep_masks

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "masks": [self._masks.get(id(p)) for p in self._params],
            "mode": self.mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if len(masks) != len(self._params):
            raise ValueError(
                f"state has masks for {len(masks)} parameters, expected {len(self._params)}"
            )
        if state.get("mode", "restore") != self.mode:
            raise ValueError(
                f"the state is of a {state.get('mode', 'restore')}-mode optimizer, this one is "
                f"{self.mode}: create it with mode={state.get('mode', 'restore')!r}"
            )
        if self.mode == "compact":
            for param, mask in zip(self._params, masks, strict=True):
                mine = self._masks.get(id(param))
                same = (mask is None and mine is None) or (
                    mask is not None
                    and mine is not None
                    and torch.equal(selected_indices(mask.to(mine.device)), selected_indices(mine))
                )
                if not same:
                    raise ValueError(
                        "a compact-mode state only loads into an optimizer with the same masks"
                    )
        self.optimizer.load_state_dict(state["optimizer"])
        self._masks = {
            id(p): m.to(p.device) for p, m in zip(self._params, masks, strict=True) if m is not None
        }
        self._keep_masks, self._before = None, None
