"""Swapping a library layer for its fused twin in place, the way Liger-Kernel's ``apply_liger_kernel_to_*`` does.

The twin is a subclass of the library class that only overrides the methods doing the gate mixing;
``module.__class__`` is reassigned, so the module keeps its parameters, buffers, hooks and
``state_dict`` keys, loads the original's checkpoint with ``strict=True`` and survives
``copy.deepcopy`` and pickling (the twins live at importable paths).

A subclass of a library class is swapped (and converted by ``to_fused``) only when it keeps the library's
``forward`` and every other method the twin reproduces (``FusedTwin.reproduces``): its twin is built
from the subclass and the library's twin, so the subclass's other methods stay.
"""

from __future__ import annotations

import copyreg
import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    # The library methods whose computation the twin (and to_fused) reproduces: a subclass overriding one
    # of them computes something else, so it is neither swapped nor converted.
    reproduces: tuple[str, ...] = ("forward",)

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be swapped, or None."""
        return None

    @classmethod
    def caveat(cls, module: nn.Module) -> str | None:
        """What to know about a module swapped as it is (e.g. that the library cannot run it), or None."""
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

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        twin, subclass = _SUBCLASS_TWINS.get(type(self), (None, None))
        if twin is None or reduced[0] is not copyreg.__newobj__:
            return reduced
        # A subclass's twin is built at swap time: pickle how to build it again, not the class itself.
        return (_new_subclass_twin, (twin, subclass), *reduced[2:])


# twin of a library subclass -> (the library class's twin, the subclass)
_SUBCLASS_TWINS: dict[type, tuple[type[FusedTwin], type]] = {}


@functools.cache
def subclass_twin(twin: type[FusedTwin], subclass: type) -> type[FusedTwin]:
    """The twin of ``subclass`` (of a library class): ``twin``'s methods before ``subclass``'s, the library's last."""
    built = type(f"Fused{subclass.__name__}", (twin, subclass), {"__module__": twin.__module__})
    _SUBCLASS_TWINS[built] = (twin, subclass)
    return built


def _new_subclass_twin(twin: type[FusedTwin], subclass: type) -> FusedTwin:
    return object.__new__(subclass_twin(twin, subclass))


def overridden(cls: type, library_class: type, methods: tuple[str, ...]) -> list[str]:
    """The ``methods`` that ``cls``, a subclass of ``library_class``, defines anew."""
    return [m for m in methods if getattr(cls, m) is not getattr(library_class, m)]


def subclass_problem(cls: type, library_class: type, methods: tuple[str, ...], library: str) -> str | None:
    """Why a ``library_class`` subclass cannot be swapped or converted (it overrides one of ``methods``), or None."""
    if changed := overridden(cls, library_class, methods):
        return (
            f"{cls.__name__} is a subclass of {library} {library_class.__name__} that overrides "
            f"{' and '.join(changed)}, which the fused model would replace with the library's computation"
        )
    return None


def refuse_overridden(module: nn.Module, library_class: type, methods: tuple[str, ...], library: str, where: str):
    """``to_fused``'s rule, the same as ``swap_in``'s: ``TypeError`` naming ``where`` when ``module``'s class
    overrides one of ``methods`` (a swapped module, whose twin computes the library's result, passes)."""
    if isinstance(module, FusedTwin):
        return
    if (problem := subclass_problem(type(module), library_class, methods, library)) is not None:
        raise TypeError(f"cannot convert {where}: {problem}")


def _beyond_kernel_limits(layouts: Mapping[str, GateLayout]) -> str | None:
    for layout in layouts.values():
        if layout.num_experts > MAX_EXPERTS or layout.num_gates > MAX_TASKS:
            return (
                f"a level has {layout.num_gates} gates over {layout.num_experts} experts; the fused kernels "
                f"support at most {MAX_TASKS} gates and {MAX_EXPERTS} experts"
            )
    return None


def _where(name: str) -> str:
    return f"'{name}'" if name else "the model itself"


@dataclass
class Swaps:
    """What one ``swap_in`` found: the modules it swapped, those swapped before, those it left unchanged."""

    swapped: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def __iadd__(self, other: Swaps) -> Swaps:
        self.swapped += other.swapped
        self.already += other.already
        self.left += other.left
        return self


def _library_class(cls: type, twins: Mapping[type, type[FusedTwin]]) -> type | None:
    return next((base for base in cls.__mro__ if base in twins), None)


def swap_layers(model: nn.Module, twins: Mapping[type, type[FusedTwin]], library: str) -> Swaps:
    """Reassign every sub-module of ``model`` that is an instance of a library class with a twin.

    A module the twin cannot express, or a subclass that overrides a method the twin reproduces, stays
    unchanged, with a warning naming it and why; a module swapped before is counted, not swapped again.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swaps = Swaps()
    for name, module in model.named_modules():
        cls = type(module)
        library_class = _library_class(cls, twins)
        if library_class is None:
            continue
        if isinstance(module, FusedTwin):
            swaps.already.append(name)
            continue
        twin = twins[library_class]
        reason = subclass_problem(cls, library_class, twin.reproduces, library) or twin.unsupported(module)
        layouts = twin.layouts(module) if reason is None else {}
        reason = reason or _beyond_kernel_limits(layouts)
        if reason is not None:
            warnings.warn(
                f"fused_gate.swap_in: {library} {cls.__name__} at {_where(name)} left unchanged: {reason}",
                UserWarning,
                stacklevel=3,
            )
            swaps.left.append(name)
            continue
        if caveat := twin.caveat(module):
            warnings.warn(
                f"fused_gate.swap_in: {library} {cls.__name__} at {_where(name)} swapped, but {caveat}",
                UserWarning,
                stacklevel=3,
            )
        device = module_device(module)
        module.__class__ = twin if cls is library_class else subclass_twin(twin, cls)
        module.gate_layouts = {key: layout.to(device) for key, layout in layouts.items()}
        swaps.swapped.append(name)
    return swaps


def report(swaps: Swaps, looked_for: str) -> list[str]:
    """The swapped names; when there are none, a warning saying what was found instead."""
    if not swaps.swapped:
        if swaps.left:
            found = f"every {looked_for} found was left unchanged (see the warnings above)"
        elif swaps.already:
            found = f"the layers it supports are already swapped: {', '.join(map(_where, swaps.already))}"
        else:
            found = f"the model holds no supported {looked_for}"
        warnings.warn(f"fused_gate.swap_in: nothing swapped, {found}", UserWarning, stacklevel=3)
    return swaps.swapped
