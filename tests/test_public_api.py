"""The public API as a user meets it: every exported name documented and usable as
exported, and no reach into another package's private modules."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import ease
import ease_kernels

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", [ease, ease_kernels], ids=lambda p: p.__name__)
def test_every_exported_name_exists_and_is_documented(package) -> None:
    for name in package.__all__:
        value = getattr(package, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{package.__name__}.{name} has no docstring"


def test_exported_objects_work_as_exported() -> None:
    model = ease.DeepSupervisionTransformer(vocab_size=40, dim=16, num_layers=3, num_heads=2, max_seq_len=16)
    rule = ease.ExitRule.for_model(model, 0.5, 2, "margin")
    assert list(rule.checked_layers) == [2]
    cache = ease.KVCache.for_model(model, batch_size=2, max_len=8)
    slots = ease.CacheSlots.shared(model, 0, 3)
    k = torch.randn(2, 3, model.config.num_kv_heads, model.config.head_dim)
    keys, values = cache.update(1, slots, k, k)
    assert torch.equal(keys[:, :3], k)
    assert ease.depth_loss_weights(3, "linear")[3] == pytest.approx(0.5)
    assert set(ease.EXIT_CRITERIA) == {"max_prob", "margin", "saturation", "classifier"}


def test_ease_imports_only_public_names_of_ease_kernels() -> None:
    offenders = []
    for path in (ROOT / "ease").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ease_kernels"):
                private_module = any(part.startswith("_") for part in node.module.split("."))
                private_names = [alias.name for alias in node.names if alias.name.startswith("_")]
                if private_module or private_names:
                    offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import ...")
    assert not offenders, "\n".join(offenders)


def test_one_ignore_index_and_one_threshold_grid() -> None:
    from ease import calibration, data, experiments, exits

    assert ease.IGNORE_INDEX is data.IGNORE_INDEX == -100
    assert calibration.DEFAULT_THRESHOLDS is exits.DEFAULT_THRESHOLDS
    assert experiments.ExperimentSettings().thresholds == exits.DEFAULT_THRESHOLDS
