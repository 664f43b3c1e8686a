"""Serving child program: runs what ``tests/test_serving.py`` exported, in a Python that cannot import fused_gate.

    python -I -S tests/serving_child.py FOLDER SITE_DIR...

``-I -S``: no environment variables, no user site, no ``site`` module, so no ``.pth`` file runs (an
editable install's import finder is installed by one). ``sys.path`` is the standard library plus the
``SITE_DIR`` folders (where torch and its dependencies live), and the child first checks that fused_gate
cannot be found there. For each key of ``FOLDER/inputs.pt`` (``{name: {batch: inputs}}``) it loads
``FOLDER/<name>.pt2``, an AOTInductor package for ``package`` and a saved program (``torch.export.save``)
for the others, runs it on every batch of its inputs, checks that nothing imported fused_gate meanwhile,
and saves the outputs, by the same keys, to ``FOLDER/outputs.pt``.
"""

import importlib.util
import sys
from pathlib import Path

folder, site_dirs = Path(sys.argv[1]), sys.argv[2:]
sys.path.extend(site_dirs)
assert importlib.util.find_spec("fused_gate") is None, f"fused_gate is importable from {sys.path}"

import torch  # noqa: E402  (after the check: nothing may bring fused_gate in)

inputs = torch.load(folder / "inputs.pt")
outputs = {}
for name, batches in inputs.items():
    path = str(folder / f"{name}.pt2")
    run = torch._inductor.aoti_load_package(path) if name == "package" else torch.export.load(path).module()
    outputs[name] = {batch: run(args) for batch, args in batches.items()}
loaded = sorted(name for name in sys.modules if name.partition(".")[0] == "fused_gate")
assert not loaded, f"fused_gate was imported: {loaded}"
torch.save(outputs, folder / "outputs.pt")
