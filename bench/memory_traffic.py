"""Count the bytes Triton kernels load and store, by hooking the Triton interpreter (``TRITON_INTERPRET=1``).

Every memory instruction of the interpreter goes through ``InterpreterBuilder.create_masked_load``,
``create_masked_store`` (plain, block-pointer and descriptor accesses included) or the two atomics;
pointers there are numpy arrays of absolute byte addresses. Within :class:`count_traffic`, each kernel
launch is recorded as a :class:`LaunchTraffic`:

- ``loaded`` / ``stored``: the bytes of every unmasked lane of every access (``lanes x element size``),
  what the caches must serve (an atomic counts as a load and a store);
- ``unique_loaded`` / ``unique_stored``: the bytes at distinct addresses, what DRAM must serve at the
  least when every re-read hits a cache;
- ``programs``: the grid size; ``by_operand``: the same counts per pointer argument of the kernel,
  named by the kernel's own parameter names (arguments sharing storage are named together).

Nothing here knows the kernels: any ``@triton.jit`` function launched through the interpreter is counted.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Traffic:
    """Bytes of one launch or of one operand of it (see the module docstring)."""

    loaded: int = 0
    stored: int = 0
    unique_loaded: int = 0
    unique_stored: int = 0

    @property
    def total(self) -> int:
        return self.loaded + self.stored

    @property
    def unique(self) -> int:
        return self.unique_loaded + self.unique_stored


@dataclass
class LaunchTraffic(Traffic):
    kernel: str = ""
    programs: int = 0
    by_operand: dict[str, Traffic] = field(default_factory=dict)


class _Accesses:
    """The addresses one launch touched, grouped by (operand, direction, element size)."""

    def __init__(self, kernel: str, operands: list[tuple[str, int, int]]):
        self.kernel = kernel
        # Operand byte ranges [start, end) sorted by start, to attribute an address to its tensor.
        self.operands = sorted(operands, key=lambda o: o[1])
        self.starts = np.array([o[1] for o in self.operands], dtype=np.uint64)
        self.addresses: dict[tuple[str, str, int], list[np.ndarray]] = defaultdict(list)

    def operand_of(self, addresses: np.ndarray) -> np.ndarray:
        index = np.searchsorted(self.starts, addresses, side="right").astype(np.int64) - 1
        names = np.array([o[0] for o in self.operands] + ["other"], dtype=object)
        ends = np.array([o[2] for o in self.operands] + [0], dtype=np.uint64)
        index[index < 0] = len(self.operands)
        outside = addresses >= ends[index]
        index[outside] = len(self.operands)
        return names[index]

    def add(self, direction: str, ptrs: np.ndarray, mask: np.ndarray, size: int) -> None:
        addresses = np.asarray(ptrs, dtype=np.uint64)[np.broadcast_to(mask, np.shape(ptrs))].ravel()
        if addresses.size == 0:
            return
        owners = self.operand_of(addresses)
        for name in np.unique(owners):
            self.addresses[name, direction, size].append(addresses[owners == name])

    def summary(self, programs: int) -> LaunchTraffic:
        launch = LaunchTraffic(kernel=self.kernel, programs=programs)
        for (name, direction, size), chunks in self.addresses.items():
            addresses = np.concatenate(chunks)
            total, unique = addresses.size * size, np.unique(addresses).size * size
            part = launch.by_operand.setdefault(name, Traffic())
            for record in (launch, part):
                setattr(record, direction, getattr(record, direction) + total)
                setattr(record, f"unique_{direction}", getattr(record, f"unique_{direction}") + unique)
        return launch


def _element_size(ptrs) -> int:
    # int1 pointers address bytes, as in the interpreter's own pointer arithmetic.
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _tensor_operands(arg_names: list[str], args: list, kwargs: dict) -> list[tuple[str, int, int]]:
    """(names, first byte, end byte) of each distinct storage among a launch's tensor arguments."""
    by_storage: dict[tuple[int, int], list[str]] = {}
    for name, arg in [*zip(arg_names, args, strict=False), *kwargs.items()]:
        base = getattr(arg, "base", arg)  # TensorWrapper (a reinterpreted dtype) keeps the tensor in .base
        if hasattr(base, "untyped_storage"):
            storage = base.untyped_storage()
            by_storage.setdefault((storage.data_ptr(), storage.nbytes()), []).append(name)
    return [("=".join(names), start, start + nbytes) for (start, nbytes), names in by_storage.items()]


class count_traffic:
    """Record every interpreted kernel launch in the block: ``with count_traffic() as launches: ...``.

    ``execute=False`` records each launch's kernel and grid without running its programs (no bytes):
    the launch plan of a shape too large to interpret.
    """

    def __init__(self, execute: bool = True):
        self.execute = execute
        self.launches: list[LaunchTraffic] = []
        self._current: _Accesses | None = None
        self._saved: dict = {}

    def __enter__(self) -> list[LaunchTraffic]:
        from triton.runtime import interpreter  # here: importing triton must wait for TRITON_INTERPRET

        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        self._saved = {
            (builder, "create_masked_load"): builder.create_masked_load,
            (builder, "create_masked_store"): builder.create_masked_store,
            (builder, "create_atomic_rmw"): builder.create_atomic_rmw,
            (builder, "create_atomic_cas"): builder.create_atomic_cas,
            (builder, "set_grid_dim"): builder.set_grid_dim,
            (executor, "_init_args_hst"): executor._init_args_hst,
        }
        counter, saved = self, {name: fn for (_, name), fn in self._saved.items()}

        def create_masked_load(builder_self, ptrs, mask, other, *args):
            counter._record("loaded", ptrs, mask.data)
            return saved["create_masked_load"](builder_self, ptrs, mask, other, *args)

        def create_masked_store(builder_self, ptrs, value, mask, *args):
            counter._record("stored", ptrs, mask.data)
            return saved["create_masked_store"](builder_self, ptrs, value, mask, *args)

        def create_atomic_rmw(builder_self, op, ptr, val, mask, *args):
            counter._record("loaded", ptr, mask.data)
            counter._record("stored", ptr, mask.data)
            return saved["create_atomic_rmw"](builder_self, op, ptr, val, mask, *args)

        def create_atomic_cas(builder_self, ptr, cmp, val, *args):
            counter._record("loaded", ptr, True)
            counter._record("stored", ptr, True)
            return saved["create_atomic_cas"](builder_self, ptr, cmp, val, *args)

        def set_grid_dim(builder_self, *dims):
            saved["set_grid_dim"](builder_self, *dims)
            counter._programs = math.prod(dims)
            if not counter.execute:
                raise _LaunchPlanned

        def init_args_hst(executor_self, args_dev, kwargs):
            args_hst, kwargs_hst = saved["_init_args_hst"](executor_self, args_dev, kwargs)
            counter._start(executor_self.fn.__name__, _tensor_operands(executor_self.arg_names, args_hst, kwargs_hst))
            return args_hst, kwargs_hst

        patches = {
            "create_masked_load": create_masked_load,
            "create_masked_store": create_masked_store,
            "create_atomic_rmw": create_atomic_rmw,
            "create_atomic_cas": create_atomic_cas,
            "set_grid_dim": set_grid_dim,
            "_init_args_hst": init_args_hst,
        }
        for owner, name in self._saved:
            setattr(owner, name, patches[name])
        self._saved[executor, "__call__"] = executor.__call__
        call = executor.__call__

        def run(executor_self, *args, **kwargs):
            with contextlib.suppress(_LaunchPlanned):
                call(executor_self, *args, **kwargs)
            counter._finish()

        executor.__call__ = run
        return self.launches

    def __exit__(self, *exc) -> None:
        for (owner, name), fn in self._saved.items():
            setattr(owner, name, fn)
        self._current = None

    def _start(self, kernel: str, operands: list[tuple[str, int, int]]) -> None:
        self._current, self._programs = _Accesses(kernel, operands), 0

    def _finish(self) -> None:
        if self._current is not None:
            self.launches.append(self._current.summary(self._programs))
        self._current = None

    def _record(self, direction: str, ptrs, mask) -> None:
        if self._current is not None:
            self._current.add(direction, ptrs.data, np.asarray(mask, dtype=bool), _element_size(ptrs))


class _LaunchPlanned(Exception):
    """Raised inside a launch that ``count_traffic(execute=False)`` only plans."""
