"""Swapping a library layer for its fused twin in place, the way Liger-Kernel's ``apply_liger_kernel_to_*`` does.

The twin is a subclass of the library class that only overrides the method doing the gate mixing;
``module.__class__`` is reassigned, so the module keeps its parameters, buffers, hooks and
``state_dict`` keys, loads the original's checkpoint with ``strict=True`` and survives
``copy.deepcopy`` and pickling (the twins live at importable paths).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from fused_gate._validation import MAX_EXPERTS, MAX_TASKS
from fused_gate.integrations._gates import GateLayout


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module without tensors)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class FusedTwin(nn.Module):
    """Base of the fused twins. ``gate_layouts`` (not buffers, so the ``state_dict`` is unchanged) follow
    the module's device through ``.to()``, ``.cuda()`` and ``to_empty()``."""

    gate_layouts: dict[str, GateLayout]

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be swapped, or None."""
        return None

    @classmethod
    def layouts(cls, module: nn.Module) -> dict[str, GateLayout]:
        """The gate layouts of ``module``'s levels, by name, on CPU."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = module_device(self)
        self.gate_layouts = {name: layout.to(device) for name, layout in self.gate_layouts.items()}
        return self


def _beyond_kernel_limits(layouts: Mapping[str, GateLayout]) -> str | None:
    for layout in layouts.values():
        if layout.num_experts > MAX_EXPERTS or layout.num_gates > MAX_TASKS:
            return (
                f"a level has {layout.num_gates} gates over {layout.num_experts} experts; the fused kernels "
                f"support at most {MAX_TASKS} gates and {MAX_EXPERTS} experts"
            )
    return None


def swap_layers(model: nn.Module, twins: Mapping[type, type[FusedTwin]], library: str) -> list[str]:
    """Reassign every sub-module of ``model`` whose exact class has a twin; returns their qualified names.

    A module that cannot be expressed by the twin stays unchanged, with a warning naming it and why.
    Subclasses of the library classes are not swapped: they may override the forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swapped = []
    for name, module in model.named_modules():
        twin = twins.get(type(module))
        if twin is None:
            continue
        reason = twin.unsupported(module)
        layouts = twin.layouts(module) if reason is None else {}
        reason = reason or _beyond_kernel_limits(layouts)
        if reason is not None:
            where = f"'{name}'" if name else "the model itself"
            warnings.warn(
                f"fused_gate.swap_in: {library} {type(module).__name__} at {where} left unchanged: {reason}",
                UserWarning,
                stacklevel=3,
            )
            continue
        device = module_device(module)
        module.__class__ = twin
        module.gate_layouts = {key: layout.to(device) for key, layout in layouts.items()}
        swapped.append(name)
    return swapped


def warn_if_nothing_swapped(swapped: list[str], looked_for: str) -> list[str]:
    if not swapped:
        warnings.warn(f"fused_gate.swap_in: nothing swapped, the model holds no supported {looked_for}", stacklevel=3)
    return swapped
