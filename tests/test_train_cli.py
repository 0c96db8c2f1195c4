"""Tests of ease.cli.train (``python -m ease.train``) and ease.training_run: a tiny run end to end from a TOML file,
resume, overrides, the errors that stop a run before anything is written, every example
config, and the plots.

The runs train a 16-wide, 3-layer model for 6 steps on 40 kB of the built-in corpus with a
300-token BPE cached in ``tmp_path``, so each takes about a second.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from ease import Trainer, TrainingConfig
from ease import training_run as runs
from ease.cli import train as train_cli
from ease.training_run import execute as run_execute
from ease.data import load_data, load_default_text
from ease.models import DeepSupervisionTransformer, load_model
from tokenizers import Tokenizer

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.toml"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RUN_TOML = """
[model]
class = "deep_supervision"
dim = 16
num_layers = 3

[data]
text = "{text}"
vocab_size = 300
seq_len = 16
batch_size = 8

[l3t]
layer_weights = {{"1" = 0.7, "2" = 0, "3" = 0.3}}
layer_lr_scales = [1.0, 0.5, 0.1]
routing_threshold = 0.5

[training]
base_lr = 3e-3
max_steps = 6
eval_every = 3
log_every = 1

[output]
dir = "{out}"
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Tokenizers go to a cache in ``tmp_path``, never the user's ``~/.cache``."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EASE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def corpus(tmp_path) -> Path:
    """About 40 kB of the built-in corpus: enough for a few hundred tiny batches."""
    path = tmp_path / "text.txt"
    path.write_text(load_default_text()[:40_000], encoding="utf-8")
    return path


@pytest.fixture
def run_file(tmp_path, corpus) -> Path:
    """A tiny run file whose output folder is ``tmp_path/out``."""
    path = tmp_path / "run.toml"
    path.write_text(RUN_TOML.format(text=corpus.as_posix(), out=(tmp_path / "out").as_posix()), encoding="utf-8")
    return path


def run_cli(*args: str) -> int:
    return train_cli.main([*args, "--quiet", "--threads", "1"])


def metrics_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- a run end to end


def test_tiny_run_writes_every_output_consistently(run_file, tmp_path) -> None:
    out = tmp_path / "out"
    assert run_cli("--config", str(run_file)) == 0

    for name in ("metrics.jsonl", "summary.json", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "checkpoints/last.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    for name in ("loss_per_layer.png", "accuracy_per_layer.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name

    lines = metrics_lines(out)
    train = [line for line in lines if line["kind"] == "train"]
    evals = [line for line in lines if line["kind"] == "eval"]
    assert [line["step"] for line in train] == [1, 2, 3, 4, 5, 6]  # log_every = 1
    assert [line["step"] for line in evals] == [3, 6]  # eval_every = 3
    assert all(set(line["layers"]) == {"1", "3"} for line in train)  # layer 2 weighs 0: no logits
    assert all(set(line["layers"]) == {"1", "2", "3"} for line in evals)

    summary = json.loads((out / "summary.json").read_text())
    stopping = summary["early_stopping"]
    assert stopping["steps_run"] == 6 and len(stopping["history"]) == 2
    assert [h["step"] for h in stopping["history"]] == [3, 6]
    assert summary["config"]["l3t"]["layer_weights"] == {"1": 0.7, "2": 0.0, "3": 0.3}
    assert summary["config"]["l3t"]["layer_lr_scales"] == {"1": 1.0, "2": 0.5, "3": 0.1}
    assert summary["data"]["vocab_size"] == summary["model"]["config"]["vocab_size"]
    assert summary["data"]["train_batches"] > 6 and summary["data"]["val_tokens"] > 0
    assert summary["versions"]["torch"] and summary["wall_seconds"] >= summary["train_seconds"] > 0
    # The eval lines are the history's evaluations.
    for line, entry in zip(evals, stopping["history"]):
        assert line["objective"] == entry["val_loss"]

    # The saved model, reloaded, gives exactly the figures the summary reports (same CPU,
    # same thread count, same batches: the same float operations).
    model = load_model(out / "model")
    assert isinstance(model, DeepSupervisionTransformer) and model.num_layers == 3
    data = load_data(corpus_path(summary), vocab_size=300, seq_len=16, batch_size=8)
    saved_tokenizer = Tokenizer.from_file(str(out / "model" / "tokenizer.json"))
    assert saved_tokenizer.get_vocab() == data.tokenizer.get_vocab()
    config = TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3}, routing_threshold=0.5, verbose=False)
    figures = json.loads(json.dumps(run_execute._finite_json(Trainer(config, data.vocab_size).evaluate(model, data.val_batches))))
    assert figures == summary["evaluation"]
    assert summary["evaluation"]["objective"] == min(h["val_loss"] for h in stopping["history"])


def corpus_path(summary: dict) -> str:
    return summary["config"]["data"]["text"]


def test_resume_continues_from_the_last_checkpoint(run_file, tmp_path) -> None:
    out = tmp_path / "out"
    assert run_cli("--config", str(run_file)) == 0
    assert run_cli("--config", str(run_file), "--set", "output.resume=true", "--set", "training.max_steps=9") == 0
    lines = metrics_lines(out)
    assert [line["step"] for line in lines if line["kind"] == "train"] == list(range(1, 10))
    assert [line["step"] for line in lines if line["kind"] == "eval"] == [3, 6, 9]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopping"]["steps_run"] == 9
    assert [h["step"] for h in summary["early_stopping"]["history"]] == [3, 6, 9]


def test_a_previous_run_is_refused_unless_overwritten(run_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert run_cli("--config", str(run_file)) == 0
    capsys.readouterr()
    assert run_cli("--config", str(run_file)) == 2
    assert "holds a previous run" in capsys.readouterr().err
    assert run_cli("--config", str(run_file), "--set", "output.overwrite=true", "--set", "training.max_steps=3") == 0
    assert [line["step"] for line in metrics_lines(out) if line["kind"] == "train"] == [1, 2, 3]


# ------------------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    "text, value",
    [("2000", 2000), ("0.9", 0.9), ("true", True), ('"stdlib"', "stdlib"), ("stdlib", "stdlib"),
     ("{1 = 0.7, 3 = 0.3}", {"1": 0.7, "3": 0.3}), ("[0.9, 0.99]", [0.9, 0.99]), ("runs/a b", "runs/a b")],
)  # fmt: skip
def test_set_values_are_toml_or_plain_strings(text, value) -> None:
    assert runs.parse_value(text) == value


def test_set_overrides_single_keys(run_file) -> None:
    spec = runs.load_run_spec(
        run_file,
        ["training.max_steps=2000", "l3t.routing_threshold=0.9", "data.text=none", 'data.corpus="stdlib"',
         "l3t.layer_weights=linear", "training.eval_every=none", "model.num_layers=4", "l3t.layer_lr_scales=none"],
    )  # fmt: skip
    assert spec.config.max_steps == 2000 and spec.config.eval_every is None
    assert spec.config.routing_threshold == 0.9
    assert spec.data_kwargs["corpus"] == "stdlib" and spec.data_kwargs["path"] is None
    assert spec.config.layer_weights == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4})
    assert spec.model_kwargs["num_layers"] == 4 and spec.tables["model"]["dim"] == 16
    # Later overrides win; an unquoted string is a string.
    spec = runs.load_run_spec(run_file, ["data.text=none", "data.corpus=docs", "training.lr_schedule=cosine",
                                              "training.lr_schedule=linear"])  # fmt: skip
    assert spec.data_kwargs["corpus"] == "docs" and spec.config.lr_schedule == "linear"


@pytest.mark.parametrize("text", ["training.max_steps", "max_steps=3", "a.b.c=1", ".x=1"])
def test_a_malformed_set_is_refused(text) -> None:
    with pytest.raises(runs.ConfigError, match="table.key=value"):
        runs.parse_override(text)


# ----------------------------------------------------------- errors before anything is written


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_step=10", r"^error: unknown key training\.max_step \(did you mean training\.max_steps\?\); "
                                 r"known keys of \[training\]: .*max_steps"),
        ("trainig.max_steps=10", r"^error: unknown table \[trainig\] \(did you mean 'training'\?\)"),
        ("training.layer_weights=uniform", r"unknown key training\.layer_weights \(it belongs in \[l3t\]"),
        ("training.log_dir=logs", r"training\.log_dir is set by the command; use output\.dir"),
        ("training.max_steps=ten", r"^error: training\.max_steps must be an integer >= 1 or None, got 'ten'$"),
        ("training.max_steps=0", r"^error: training\.max_steps must be an integer >= 1 or None, got 0$"),
        ("training.compile=yes", r"^error: training\.compile must be True or False, got 'yes'$"),
        ("training.patience=1.5", r"^error: training\.patience must be an integer >= 1, got 1\.5$"),
        ("l3t.routing_threshold=1.5", r"^error: l3t\.routing_threshold must be in \(0, 1\]"),
        ("l3t.layer_weights={9 = 1.0}", r"^error: l3t\.layer_weights has layer 9, but the model has num_layers=3"),
        ("l3t.layer_weights={one = 1.0}", r"l3t\.layer_weights keys must be layer numbers"),
        ("l3t.layer_weights=[1, 2]", r"l3t\.layer_weights as a list needs one value per layer, 3"),
        ("l3t.layer_lr_scales={1 = -1}", r"^error: l3t\.layer_lr_scales\[1\] must be > 0, got -1"),
        ("model.dim=ten", r"^error: model\.dim must be a positive integer, got 'ten'$"),
        ("model.class=big", r"^error: model\.class must be one of standard, deep_supervision"),
        ("model.class=standard", r"^error: l3t\.layer_weights gives weight to layers \[1\] below the last layer"),
        ("data.vocab_size=100", r"^error: data\.vocab_size must be an integer >= 257"),
        ("data.corpus=stdlib", r"data\.corpus and data\.text are both set"),
        ("data.text=missing.txt", r"^error: data\.text: no such file 'missing\.txt'$"),
        ("output.resume=maybe", r"^error: output\.resume must be True or False, got 'maybe'$"),
    ],
)  # fmt: skip
def test_bad_keys_and_values_stop_before_anything_is_written(run_file, tmp_path, cache, capsys, override, message) -> None:
    assert run_cli("--config", str(run_file), "--set", override) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err.strip()), err
    assert not (tmp_path / "out").exists()
    assert not cache.exists()  # not even the tokenizer was trained


def test_a_config_file_that_is_not_toml_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[training]\nmax_steps = = 3\n", encoding="utf-8")
    assert run_cli("--config", str(path)) == 2
    assert capsys.readouterr().err.startswith(f"error: {path} is not valid TOML")
    assert run_cli("--config", str(tmp_path / "none.toml")) == 2
    assert "no config file" in capsys.readouterr().err


def test_a_key_outside_a_table_is_refused(tmp_path) -> None:
    with pytest.raises(runs.ConfigError, match=r"'max_steps' must be set inside a table: training\.max_steps"):
        runs.load_run_spec(None, raw={"max_steps": 3})


# --------------------------------------------------------------------------- example configs


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_is_valid(path, tmp_path) -> None:
    spec = runs.load_run_spec(path, [f"output.dir={(tmp_path / 'out').as_posix()}"])
    assert spec.model_class in ("StandardTransformer", "DeepSupervisionTransformer")
    assert spec.config.layer_weights and set(spec.config.layer_weights) <= set(range(1, spec.model_kwargs["num_layers"] + 1))
    model = spec.build_model(spec.data_kwargs["vocab_size"] or 1000)
    spec.config.validate_for(model)
    spec.config.check_recipe_for(model)


def test_the_example_configs_are_the_ones_documented() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"standard.toml", "deep_supervision.toml", "asymmetric.toml", "layerskip.toml", "l3t.toml"} <= names
    asymmetric = runs.load_run_spec(EXAMPLES[[p.name for p in EXAMPLES].index("asymmetric.toml")],
                                         ["output.dir=unused"])  # fmt: skip
    assert asymmetric.config.layer_weights == {1: 0.7, 2: 0.0, 3: 0.3}
    assert asymmetric.config.layer_lr_scales == {1: 1.0, 2: 0.5, 3: 0.1}
    assert asymmetric.config.routing_threshold == 0.95 and asymmetric.model_kwargs["num_layers"] == 3


def test_the_layerskip_example_trains_when_made_tiny(tmp_path, corpus) -> None:
    """The deepest recipe (layer dropout, rotational curriculum, cosine) runs, shrunk by --set."""
    out = tmp_path / "layerskip"
    path = EXAMPLES[[p.name for p in EXAMPLES].index("layerskip.toml")]
    status = run_cli(
        "--config", str(path), "--set", "data.corpus=none", "--set", f"data.text={corpus.as_posix()}",
        "--set", "data.vocab_size=300", "--set", "data.seq_len=16", "--set", "data.batch_size=4",
        "--set", "model.dim=16", "--set", "model.max_seq_len=16", "--set", "model.num_layers=4",
        "--set", "training.max_steps=4", "--set", "training.eval_every=2", "--set", "training.warmup_steps=1",
        "--set", "training.log_every=1", "--set", f"output.dir={out.as_posix()}",
        # Its compile = true is for the GPU: inductor's one-off compile would take most of a minute here.
        "--set", "training.compile=false",
    )  # fmt: skip
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopping"]["steps_run"] == 4
    assert set(summary["evaluation"]["layers"]) == {"1", "2", "3", "4"}


# --------------------------------------------------------------------------------- plots


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "eval", "step": 1, "loss": 1.0, "accuracy": 0.5}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert runs.plot_loss_per_layer(metrics, tmp_path / "a.png") is None
    assert runs.plot_accuracy_per_layer({"loss": 1.0, "accuracy": 0.5}, tmp_path / "b.png") is None
    assert not list(tmp_path.glob("*.png"))


def test_plots_of_a_model_trained_on_its_last_layer(tmp_path) -> None:
    """A StandardTransformer's evaluations have no per-layer figures: the final layer stands alone."""
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "train", "step": 1, "loss": 5.0, "layers": {"2": {"loss": 5.0, "accuracy": 0.1}}},
        {"kind": "train", "step": 2, "loss": 4.0, "layers": {"2": {"loss": 4.0, "accuracy": 0.2}}},
        {"kind": "eval", "step": 2, "loss": 4.5, "accuracy": 0.2, "objective": 4.5},
        {"kind": "train", "step": 2, "loss": 3.9, "layers": {"2": {"loss": 3.9, "accuracy": 0.2}}},  # resumed
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    train, evals = runs.read_metrics(metrics)
    assert [r["loss"] for r in train] == [5.0, 3.9]  # the line written last for a step is kept
    assert runs.plot_loss_per_layer(metrics, tmp_path / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    figure = runs.plot_accuracy_per_layer({"loss": 4.5, "accuracy": 0.2}, tmp_path / "acc.png")
    assert figure.read_bytes()[:8] == PNG_SIGNATURE


# ------------------------------------------------------------------------------- threads


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (4, 1), (8, None), (64, None)])
def test_default_threads_is_one_on_small_machines(monkeypatch, cores, threads) -> None:
    monkeypatch.setattr(run_execute.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert run_execute.default_threads() == threads


def test_help_lists_every_table_and_key(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        train_cli.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for table in ("[model]", "[data]", "[l3t]", "[training]", "[output]"):
        assert table in text
    for key in ("layer_weights", "routing_threshold", "max_steps", "exit_curriculum", "resume", "spin-waiting"):
        assert key in text
