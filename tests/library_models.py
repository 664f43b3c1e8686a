"""torch-rechub and DeepCTR-Torch MMOE / PLE on synthetic features, for the swap-in and converter tests,
and for ``bench.swap_in_step`` / ``bench.convert_step``, which time the same models.

Every builder returns ``(model, inputs)`` with peaked gates (scaled gate weights, so a wrong softmax shows),
dropout in the experts and towers, BatchNorm with non-trivial running statistics, and inputs of
``batch`` rows. ``import_offline`` imports a library without network traffic.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType, SimpleNamespace
from unittest import mock

import torch
from torch import nn

SPARSE = {"s0": 7, "s1": 5}  # name -> vocabulary size
DENSE = ("d0", "d1")
EMBED = 4
GATE_SCALE = 5.0
DROPOUT = 0.25
TASK_TYPES = ("classification", "regression", "classification")

# URLs DeepCTR-Torch's import-time version check asked for, answered locally by import_offline.
VERSION_CHECK_CALLS: list[str] = []


def import_offline(name: str) -> ModuleType:
    """Import ``name`` with ``requests.get`` answered locally (HTTP 503), then wait for threads it started.

    DeepCTR-Torch's package import starts a thread that asks PyPI for newer versions through
    ``requests.get`` and only logs the result. Answering that one call in-process, and joining the
    thread before the patch is undone, keeps the tests off the network without changing anything the
    models compute; a 503 makes the check end silently.
    """
    if name in sys.modules:
        return sys.modules[name]
    import requests

    def no_network(url, *args, **kwargs):
        VERSION_CHECK_CALLS.append(url)
        return SimpleNamespace(status_code=503, text="")

    before = set(threading.enumerate())
    with mock.patch.object(requests, "get", no_network):
        module = importlib.import_module(name)
        for thread in set(threading.enumerate()) - before:
            thread.join(timeout=60)
    return module


def _realistic_(model: nn.Module, gate_layers: list[nn.Module], seed: int) -> None:
    """Unit-scale weights (the libraries' tiny inits make every gate uniform), peaked gates, and
    BatchNorm running statistics away from (0, 1) so eval mode differs from train mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                fan_in = module.in_features
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            elif isinstance(module, nn.BatchNorm1d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
        for layer in gate_layers:
            layer.weight.mul_(GATE_SCALE)


def _tasks(num_tasks: int) -> tuple[str, ...]:
    return tuple(TASK_TYPES[t % len(TASK_TYPES)] for t in range(num_tasks))


# ---------------------------------------------------------------------------- torch-rechub


def _rechub_features():
    from torch_rechub.basic.features import DenseFeature, SparseFeature

    return [SparseFeature(n, vocab_size=v, embed_dim=EMBED) for n, v in SPARSE.items()] + [
        DenseFeature(n) for n in DENSE
    ]


def _rechub_inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    x = {n: torch.randint(0, v, (batch,), generator=gen) for n, v in SPARSE.items()}
    x.update({n: torch.randn(batch, generator=gen) for n in DENSE})
    return x


def _rechub_gate_layers(model: nn.Module) -> list[nn.Module]:
    """The first Linear of every gate MLP; its BatchNorm gets a larger scale too."""
    from torch_rechub.basic.layers import MLP

    gates = [m for name, m in model.named_modules() if isinstance(m, MLP) and "gate" in name]
    for gate in gates:
        with torch.no_grad():
            gate.mlp[1].weight.fill_(GATE_SCALE)
    return [gate.mlp[0] for gate in gates]


def _rechub(class_name: str, batch: int, num_tasks: int, hidden, seed: int, **sizes):
    models = import_offline("torch_rechub.models.multi_task")
    torch.manual_seed(seed)
    model = getattr(models, class_name)(
        _rechub_features(),
        list(_tasks(num_tasks)),
        expert_params={"dims": list(hidden), "dropout": DROPOUT},
        tower_params_list=[{"dims": [6], "dropout": DROPOUT}] * num_tasks,
        **sizes,
    )
    _realistic_(model, _rechub_gate_layers(model), seed)
    return model, _rechub_inputs(batch, seed)


def rechub_mmoe(batch=16, *, num_experts=4, hidden=(16, 8), num_tasks=3, seed=0):
    return _rechub("MMOE", batch, num_tasks, hidden, seed, n_expert=num_experts)


def rechub_ple(batch=16, *, num_levels=2, per_task=2, shared=1, hidden=(16, 8), num_tasks=3, seed=0):
    sizes = dict(n_level=num_levels, n_expert_specific=per_task, n_expert_shared=shared)
    return _rechub("PLE", batch, num_tasks, hidden, seed, **sizes)


# ---------------------------------------------------------------------------- DeepCTR-Torch


def _deepctr_features():
    inputs = import_offline("deepctr_torch.inputs")
    return [inputs.SparseFeat(n, v, embedding_dim=EMBED) for n, v in SPARSE.items()] + [
        inputs.DenseFeat(n, 1) for n in DENSE
    ]


def _deepctr_inputs(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    ids = [torch.randint(0, v, (batch, 1), generator=gen).float() for v in SPARSE.values()]
    return torch.cat([*ids, torch.randn(batch, len(DENSE), generator=gen)], dim=1)


def _deepctr_kwargs(num_tasks: int, hidden, seed: int) -> dict:
    types = tuple("binary" if t == "classification" else t for t in _tasks(num_tasks))
    return dict(
        expert_dnn_hidden_units=tuple(hidden),
        tower_dnn_hidden_units=(6,),
        dnn_dropout=DROPOUT,
        dnn_use_bn=True,
        task_types=types,
        task_names=tuple(f"task{t}" for t in range(num_tasks)),
        seed=seed,
    )


def _deepctr_gate_layers(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "gate_dnn_final_layer" in name]


def deepctr_mmoe(batch=16, *, num_experts=4, hidden=(16, 8), num_tasks=3, gate_hidden=(), seed=0):
    """Without a gate DNN by default (the PLE builder covers the gate DNN)."""
    models = import_offline("deepctr_torch.models.multitask")
    model = models.MMOE(
        _deepctr_features(),
        num_experts=num_experts,
        gate_dnn_hidden_units=tuple(gate_hidden),
        **_deepctr_kwargs(num_tasks, hidden, seed),
    )
    _realistic_(model, _deepctr_gate_layers(model), seed)
    return model, _deepctr_inputs(batch, seed)


def deepctr_ple(batch=16, *, num_levels=2, per_task=2, shared=1, hidden=(16, 8), num_tasks=3, seed=0):
    """With a gate DNN (BatchNorm, dropout), so the last level's discarded shared gate has side effects."""
    models = import_offline("deepctr_torch.models.multitask")
    model = models.PLE(
        _deepctr_features(),
        shared_expert_num=shared,
        specific_expert_num=per_task,
        num_levels=num_levels,
        gate_dnn_hidden_units=(8,),
        **_deepctr_kwargs(num_tasks, hidden, seed),
    )
    _realistic_(model, _deepctr_gate_layers(model), seed)
    return model, _deepctr_inputs(batch, seed)


# name -> (builder, integration module, fused softmax_mix calls per forward)
MODELS = {
    "rechub_mmoe": (rechub_mmoe, "fused_gate.integrations.torch_rechub", 1),
    "rechub_ple": (rechub_ple, "fused_gate.integrations.torch_rechub", 2),
    "deepctr_mmoe": (deepctr_mmoe, "fused_gate.integrations.deepctr_torch", 1),
    "deepctr_ple": (deepctr_ple, "fused_gate.integrations.deepctr_torch", 2),
}


# ---------------------------------------------------------------------------- one training step


def inputs_to(inputs, device):
    """A builder's inputs (a tensor, or a dict of tensors for torch-rechub) on ``device``."""
    return {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)


def training_step(model: nn.Module, inputs, seed: int = 0):
    """Seeded forward and backward of a fixed random weighting of the outputs, from zeroed gradients.

    Returns the output, every parameter's gradient (None where the original has none) and every
    buffer after the step, by name.
    """
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7))
    (out * weights).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), grads, buffers
