"""Proof, from Triton's IR, that no load or store address is computed with 32-bit arithmetic.

Every address a Triton kernel reads or writes is built by ``tt.addptr`` (pointer + offset). The
offset is safe when each integer operation that feeds it either runs in 64 bits or only combines
values bounded by the kernel's own block sizes (``tl.arange`` and constants). A 32-bit operation on
anything that comes from the caller (an argument such as a stride, the program id, a loop index)
can overflow once an operand has more than ``2**31`` elements: ``t * stride_t`` for a transposed
``[T, B, ...]`` operand is the classic case. ``narrow_address_arithmetic`` walks the backward slice
of every ``tt.addptr`` offset in the ``ttir`` of a compiled kernel and lists such operations.

Adding an argument directly to a pointer (``ptr += stride``) is fine: the pointer is 64-bit and the
32-bit argument is sign-extended before the add.
"""

from __future__ import annotations

import re

_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::(\d+))? = ([\w.]+)(.*)$")
_VALUE = re.compile(r"%[\w.$-]+(?:#\d+)?")
_FUNC_ARG = re.compile(r"(%[\w.$-]+): ")
_FOR = re.compile(r"scf\.for (%[\w.$-]+) = ")
_ITER_ARG = re.compile(r"(%[\w.$-]+) = (%[\w.$-]+(?:#\d+)?)")
# Integer arithmetic that can overflow in 32 bits.
_ARITH = {
    "arith.addi",
    "arith.subi",
    "arith.muli",
    "arith.shli",
    "arith.divsi",
    "arith.divui",
    "arith.remsi",
    "arith.remui",
    "arith.ceildivsi",
    "arith.floordivsi",
}
# Values that come from the caller or the launch rather than from the kernel's block sizes.
_RUNTIME_SOURCES = {"argument", "loop index", "tt.get_program_id", "tt.get_num_programs"}


def _operands(rest: str) -> list[str]:
    """The SSA values an op reads: everything before its type signature and location."""
    body = rest.split(" loc(")[0]
    body = body.rsplit(" : ", 1)[0] if " : " in body else body
    body = re.sub(r"\{[^}]*\}", "", body)  # attributes such as {start = 0 : i32}
    return _VALUE.findall(body)


def _is_32_bit(rest: str) -> bool:
    result_type = rest.split(" loc(")[0].rsplit(" : ", 1)[-1].strip()
    return re.fullmatch(r"i32|tensor<[\dx]*i32(, #\w+)?>", result_type) is not None


def narrow_address_arithmetic(ttir: str) -> list[str]:
    """The 32-bit integer operations on caller-derived values that feed a ``tt.addptr`` offset.

    SSA names may repeat in sibling regions, so each use is resolved to its definition through
    the enclosing regions while reading, and the slices are walked over those definitions.
    """
    scopes: list[dict[str, int]] = [{}]  # name -> definition id, innermost region last
    defs: list[tuple[str, list[int], bool, str]] = []  # id -> (op, operand ids, 32-bit, line)
    offsets: list[int] = []

    def define(name: str, op: str, operands: list[int], narrow: bool, line: str) -> None:
        scopes[-1][name] = len(defs)
        defs.append((op, operands, narrow, line))

    def resolve(names: list[str]) -> list[int]:
        found = []
        for name in names:
            for scope in reversed(scopes):
                if name in scope:
                    found.append(scope[name])
                    break
        return found

    for raw in ttir.splitlines():
        line = raw.strip()
        if line.startswith("}"):
            scopes.pop()
            if line.endswith("{"):  # "} else {"
                scopes.append({})
            continue
        if line.startswith("tt.func"):
            for name in _FUNC_ARG.findall(line):
                define(name, "argument", [], False, line)
        match = _DEF.match(line)
        if match:
            name, count, op, rest = match.groups()
            operands = resolve(_operands(rest.split("iter_args", 1)[0] if op == "scf.for" else rest))
            for value in [f"{name}#{i}" for i in range(int(count))] if count else [name]:
                define(value, op, operands, _is_32_bit(rest), line)
            if op == "tt.addptr" and len(operands) == 2:
                offsets.append(operands[1])
        if line.endswith("{"):
            loop = _FOR.search(line)
            inits = _ITER_ARG.findall(line.split("iter_args", 1)[1]) if loop and "iter_args" in line else []
            resolved_inits = [resolve([init]) for _, init in inits]
            scopes.append({})
            if loop:
                define(loop.group(1), "loop index", [], False, line)
                for (arg, _), init in zip(inits, resolved_inits, strict=True):
                    define(arg, "iter_arg", init, False, line)

    tainted: dict[int, bool] = {}

    def is_tainted(value: int) -> bool:
        if value not in tainted:
            op, operands, _, _ = defs[value]
            tainted[value] = op in _RUNTIME_SOURCES or any(is_tainted(v) for v in operands)
        return tainted[value]

    found: set[str] = set()
    seen: set[int] = set()
    stack = list(offsets)
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        op, operands, narrow, line = defs[value]
        if op in _ARITH and narrow and any(is_tainted(v) for v in operands):
            found.add(line)
        stack.extend(operands)
    return sorted(found)


def probe_launches():
    """Two tiny kernels that read task ``t``'s row of a ``[T, N]`` operand: one with ``t * stride``
    in 32 bits (must be flagged), one widened first (must pass). They keep the analysis honest."""
    import torch
    import triton
    import triton.language as tl

    from fused_gate.kernels.launch import KernelLaunch

    @triton.jit
    def probe_narrow(x_ptr, y_ptr, stride_t, T: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        for t in range(0, T):
            tl.store(y_ptr + t * BLOCK + offs, tl.load(x_ptr + t * stride_t + offs))

    @triton.jit
    def probe_wide(x_ptr, y_ptr, stride_t, T: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        for t in range(0, T):
            row = tl.cast(t, tl.int64)
            tl.store(y_ptr + row * BLOCK + offs, tl.load(x_ptr + row * stride_t + offs))

    x, y = torch.empty(4, 64), torch.empty(4, 64)
    return [KernelLaunch(k, (1,), (x, y, 1000), dict(T=4, BLOCK=64)) for k in (probe_narrow, probe_wide)]
