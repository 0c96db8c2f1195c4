"""Tests of the depth suite (``python -m ease.experiments --suite depth``).

The recipes are checked against their definitions; one tiny run (3 layers, width 16, 4
steps per recipe, a 300-token BPE on a slice of the docs corpus) goes end to end, through
the files, the reuse of trained models and the figures. The CPU default itself (53
minutes) is not part of the suite.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from ease.cli import experiments as experiments_cli
from ease.cli.depth_suite import parse_args
from ease.data import load_data, load_default_text
from ease.depth_suite import RECIPES, DepthSuiteSettings, run_depth_suite
from ease.depth_suite.recipes import GPU_PRESET, build_recipes, check_suite_settings, l3t_options
from ease.generation.measure import decision_agreement
from ease.models import DeepSupervisionTransformer, StandardTransformer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_settings(out: Path) -> DepthSuiteSettings:
    return DepthSuiteSettings(
        out=str(out), vocab_size=300, dim=16, num_layers=3, num_heads=2, seq_len=16, batch_size=8, max_steps=4,
        warmup_steps=1, eval_every=2, eval_batches=2, min_exit_layer=1, targets=(0.5,), prompts=2, prompt_len=8,
        new_tokens=5, batch_sizes=(1, 2), repeats=1, classifier_batches=2, verbose=False,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(load_default_text()[:40_000], encoding="utf-8")
    return load_data(path, vocab_size=300, seq_len=16, batch_size=8, cache_dir=tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("depth")
    return run_depth_suite(tiny_settings(out), data), out


def test_recipes_follow_their_definitions() -> None:
    recipes = {r.name: r for r in build_recipes(DepthSuiteSettings())}
    assert tuple(recipes) == RECIPES
    assert recipes["standard"].model_class is StandardTransformer
    assert recipes["standard"].config.layer_weights == {12: 1.0}
    uniform = recipes["deep_supervision"].config.layer_weights
    assert set(uniform) == set(range(1, 13)) and max(uniform.values()) == pytest.approx(min(uniform.values()))
    asymmetric = recipes["asymmetric"].config
    assert asymmetric.layer_weights[1] == 0.7 and asymmetric.layer_weights[12] == 0.3
    assert sum(asymmetric.layer_weights.values()) == pytest.approx(1.0)
    assert asymmetric.layer_lr_scales[1] == 1.0 and asymmetric.layer_lr_scales[12] == pytest.approx(0.1)
    skip = recipes["layerskip"].config
    weights = [skip.layer_weights[l] for l in range(1, 13)]
    # LayerSkip's e_scale: weight proportional to 1 + 2 + ... + l.
    assert weights == pytest.approx([l * (l + 1) / 2 / sum(k * (k + 1) / 2 for k in range(1, 13)) for l in range(1, 13)])
    assert (skip.layer_dropout, skip.layer_dropout_shape, skip.exit_curriculum) == (0.2, "exponential", "rotational")
    l3t = recipes["l3t"].config
    assert sum(l3t.layer_weights.values()) == pytest.approx(1.0) and l3t.layer_weights[12] == 0.5
    assert 1 not in l3t.layer_weights  # below min_exit_layer=2: generation never exits there
    assert l3t.layer_dropout == 0.1 and l3t.layer_lr_scales[12] == pytest.approx(0.7)
    for recipe in recipes.values():  # one budget, one seed, one schedule
        assert (recipe.config.max_steps, recipe.config.seed, recipe.config.lr_schedule) == (400, 0, "cosine")


def test_l3t_options_spread_half_the_weight_over_the_exit_layers() -> None:
    weights, scales = l3t_options(6, 3)
    assert weights == pytest.approx({3: 0.5 / 3, 4: 0.5 / 3, 5: 0.5 / 3, 6: 0.5})
    assert [scales[l] for l in range(1, 7)] == pytest.approx([1.0, 0.94, 0.88, 0.82, 0.76, 0.7])


def test_every_recipe_is_trained_measured_and_written(finished) -> None:
    results, out = finished
    assert tuple(results["recipes"]) == RECIPES
    on_disk = json.loads((out / "results.json").read_text())
    assert tuple(on_disk["recipes"]) == RECIPES and on_disk["table"] == (out / "results.md").read_text()
    for name, run in results["recipes"].items():
        assert (out / "models" / name / "config.json").is_file()
        assert run["training"]["steps"] == 4
        assert sorted(run["layers"]) == [1, 2, 3]
        assert all(math.isfinite(v["loss"]) and 0 <= v["accuracy"] <= 1 for v in run["layers"].values())
        assert set(run["criteria"]) == {"max_prob", "margin", "saturation", "classifier"}
        assert f"| {name} |" in results["table"]


def test_speedups_are_against_full_depth_of_the_same_batch(finished) -> None:
    for run in finished[0]["recipes"].values():
        rows = run["generation"]
        for batch in (1, 2):
            full = next(r for r in rows if r["batch"] == batch and r["mode"] == "full")
            assert full["speedup"] == 1.0 and full["decision_agreement"] == 1.0
            for row in rows:
                if row["batch"] == batch:
                    assert row["speedup"] == pytest.approx(row["tokens_per_s"] / full["tokens_per_s"])


def test_self_speculation_is_lossless_in_the_suite(finished) -> None:
    for run in finished[0]["recipes"].values():
        spec = [r for r in run["generation"] if r["mode"] == "self-speculative"]
        assert len(spec) == 2 and all(r["output_agreement"] == 1.0 for r in spec)


def test_sweeps_are_ordered_and_certified_thresholds_come_from_the_grid(finished) -> None:
    for run in finished[0]["recipes"].values():
        for criterion, entry in run["criteria"].items():
            thresholds = [p["threshold"] for p in entry["sweep"]]
            assert thresholds == sorted(thresholds)
            certified = entry["certified"]["0.5"]["threshold"]
            assert certified is None or certified in thresholds


def test_trained_models_are_reused_unless_retrain(finished, data) -> None:
    results, out = finished
    again = run_depth_suite(replace(tiny_settings(out), recipes=("standard",)), data)
    assert again["recipes"]["standard"]["training"] == results["recipes"]["standard"]["training"]
    changed = run_depth_suite(replace(tiny_settings(out), recipes=("standard",), max_steps=3, eval_every=3), data)
    assert changed["recipes"]["standard"]["training"]["steps"] == 3  # other settings: trained anew


def test_figures_are_png_files(finished) -> None:
    _, out = finished
    for name in ("per_layer.png", "exit_tradeoff.png", "generation_speed.png", "criteria_speed.png",
                 "final_layer_cost.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


def test_decision_agreement_is_one_for_full_depth_greedy_and_low_for_noise() -> None:
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(50, 16, 3, num_heads=2).eval()
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    greedy = torch.stack([model.generate([p], 6).new_tokens[0] for p in prompts])
    assert decision_agreement(model, prompts, greedy) == 1.0
    other = (greedy + 1) % 50
    # Reference: one forward per position, on that position's prefix alone.
    with torch.no_grad():
        agree = [
            int(model(torch.tensor([p + row[:i].tolist()]), exit_layers=[3])[3][0, -1].argmax()) == int(row[i])
            for p, row in zip(prompts, other) for i in range(len(row))
        ]
    assert not agree[0]  # after the prompt the argmax is greedy's token, not this one
    assert decision_agreement(model, prompts, other) == pytest.approx(sum(agree) / len(agree))


def test_gpu_preset_and_flags(tmp_path) -> None:
    settings, threads = parse_args(["--suite", "depth", "--gpu", "--max-steps", "7", "--recipes", "l3t,standard"])
    assert settings.dim == GPU_PRESET["dim"] and settings.device == "cuda" and settings.max_steps == 7
    assert settings.recipes == ("l3t", "standard") and threads is None
    check_suite_settings(replace(settings, device="cpu"))  # the preset's sizes are valid
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--gpu"):
            check_suite_settings(settings)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-layers", "2"], "--num-layers"),
        (["--recipes", "standard,foo"], "--recipes"),
        (["--targets", "0.9,1.5"], "--targets"),
        (["--targets", "a"], "--targets"),
        (["--max-steps", "0"], "--max-steps"),
        (["--min-exit-layer", "12"], "--min-exit-layer"),
    ],
)
def test_bad_flags_are_one_error_line_before_any_file(tmp_path, capsys, flags, message) -> None:
    out = tmp_path / "never"
    try:
        status = experiments_cli.main(["--suite", "depth", "--out", str(out), *flags])
    except SystemExit as exit_:  # argparse's own errors (a value of the wrong type) exit at parse time
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()


def test_certified_threshold_matches_a_fresh_calibration_for_each_drop() -> None:
    from _builders import random_batches, tiny_model
    from ease.calibration import calibrate_threshold

    model = tiny_model(seed=3, weight_std=0.3, eval_mode=True)
    batches = random_batches(6, vocab_size=50, seed=4)
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
    first = calibrate_threshold(model, batches, 0.05, thresholds=grid, confidence=0.9, risk="agreement")
    seen = set()
    for drop in (0.02, 0.1, 0.2, 0.4, 0.6):
        fresh = calibrate_threshold(model, batches, drop, thresholds=grid, confidence=0.9, risk="agreement")
        assert first.certified_threshold(drop) == fresh.threshold
        seen.add(fresh.threshold)
    assert len(seen) > 1  # the drops chosen certify different thresholds
    with pytest.raises(ValueError, match="risk-controlled"):
        calibrate_threshold(model, batches, 0.1, thresholds=grid).certified_threshold(0.1)
