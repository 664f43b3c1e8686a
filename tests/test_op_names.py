"""Operator names carry the version of their schemas, so torch.compile's on-disk caches survive upgrades.

``fused_gate/op_names.py`` explains the failure this prevents: a compiled graph cached by one version,
loaded by a version whose operator took other arguments under the same name. The last test reproduces
an upgrade in two fresh processes that share one cache directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

import fused_gate  # noqa: F401  (registers the operators)
from fused_gate.op_names import NAMESPACE, SCHEMA_HASHES, SCHEMA_VERSION, op_schemas, schema_hash


def test_live_schemas_have_the_recorded_hash_of_this_version():
    live = schema_hash()
    listing = "\n".join(op_schemas().values())
    assert live == SCHEMA_HASHES.get(SCHEMA_VERSION), (
        f"the operators' schemas changed (hash {live}):\n{listing}\nA schema change needs a new version: in "
        f"fused_gate/op_names.py set SCHEMA_VERSION = {SCHEMA_VERSION + 1} and add {SCHEMA_VERSION + 1}: "
        f'"{live}" to SCHEMA_HASHES (keep the earlier entries)'
    )
    assert max(SCHEMA_HASHES) == SCHEMA_VERSION
    assert len(set(SCHEMA_HASHES.values())) == len(SCHEMA_HASHES), "two versions record the same schemas"


def test_every_operator_is_registered_under_the_versioned_name():
    registered = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith(f"{NAMESPACE}::")]
    assert registered
    unversioned = [name for name in registered if not re.fullmatch(rf"{NAMESPACE}::\w+_v{SCHEMA_VERSION}", name)]
    assert not unversioned, f"operators registered without fused_gate.op_names.op_name: {unversioned}"
    assert sorted(name.split("::")[1].removesuffix(f"_v{SCHEMA_VERSION}") for name in registered) == sorted(
        op_schemas()
    )


# Compiles a loss through attention_mix (forward and backward) and compares it with eager mode. With
# the argument "previous" it first makes torch.library.custom_op register what the previous version
# would have: every operator under the previous version's name, and each backward operator with one more
# argument (the kind of change that once broke warm caches). Prints the errors and the cache counters.
CHILD = r"""
import inspect, json, re, sys
import torch

if sys.argv[1] == "previous":
    register_op = torch.library.custom_op

    def previous_version(name, fn=None, /, *, mutates_args, **kwargs):
        name = re.sub(r"_v(\d+)$", lambda m: f"_v{int(m.group(1)) - 1}", name)
        if not re.search(r"_backward_v\d+$", name):
            return register_op(name, fn, mutates_args=mutates_args, **kwargs)

        def with_one_more_argument(impl):
            schema = torch.library.infer_schema(impl, mutates_args=mutates_args)
            schema = schema.replace(") ->", ", int legacy=0) ->", 1)
            arity = len(inspect.signature(impl).parameters)
            op = register_op(name, lambda *args, **_: impl(*args[:arity]), mutates_args=mutates_args, schema=schema)
            register_fake = op.register_fake
            op.register_fake = lambda fake: register_fake(lambda *args, **_: fake(*args[:arity]))
            return op

        return with_one_more_argument if fn is None else with_one_more_argument(fn)

    torch.library.custom_op = previous_version

import fused_gate as fg
from torch._dynamo.utils import counters

torch.manual_seed(0)
h = torch.randn(16, 4, 8, requires_grad=True)
context = torch.randn(2, 8, requires_grad=True)
weights = torch.randn(16, 2, 8)
def loss(h, context):
    return (fg.attention_mix(h, context) * weights).sum()
compiled = torch.compile(loss)(h, context)
compiled_grads = torch.autograd.grad(compiled, (h, context))
want = loss(h, context)
want_grads = torch.autograd.grad(want, (h, context))
print(json.dumps({
    "output_error": (compiled - want).abs().item(),
    "grad_error": max((g - w).abs().max().item() for g, w in zip(compiled_grads, want_grads)),
    "cache": dict(counters["aot_autograd"]),
}))
"""


def _compile_in_fresh_process(version: str, cache_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the reference path: fast on a CPU
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    env.update(TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, version], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, f"the {version} version failed to compile or run:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_upgrade_that_changes_a_schema_compiles_afresh_over_a_warm_cache(tmp_path):
    previous = _compile_in_fresh_process("previous", tmp_path)
    assert previous["cache"].get("autograd_cache_saved", 0) >= 1, f"the cache was not written: {previous}"

    upgraded = _compile_in_fresh_process("current", tmp_path)
    assert upgraded["output_error"] < 1e-5 and upgraded["grad_error"] < 1e-5, upgraded
    assert upgraded["cache"].get("autograd_cache_hit", 0) == 0, f"the previous version's graph was loaded: {upgraded}"

    # The same version in another process does load the cached graph: the miss above came from the names.
    again = _compile_in_fresh_process("current", tmp_path)
    assert again["cache"].get("autograd_cache_hit", 0) >= 1, f"the cache was not used: {again}"
    assert again["output_error"] < 1e-5 and again["grad_error"] < 1e-5, again
