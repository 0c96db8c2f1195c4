"""The lm-evaluation-harness model "ease": scores against hand computation from the model's logits.

Local tasks only (tests/lm_eval_tasks: three YAML configs over one JSONL file of 30
items, read with dataset_path: json); a tiny random model with a tokenizer trained on a
short text. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from ease import DeepSupervisionTransformer  # noqa: E402
from ease.data import END_OF_TEXT, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lm_eval_tasks"
DOCS = [json.loads(line) for line in (TASKS / "ease_tiny.jsonl").read_text().splitlines()]
TEXT = ("The quick brown fox jumps over the lazy dog. " * 30 + "Pack my box with five dozen liquor jugs. " * 30)
THRESHOLD = 0.12
LAYERS = 3


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """datasets' cache in a temporary folder, and no network."""
    cache = tmp_path_factory.mktemp("hf_cache")
    saved = {key: os.environ.get(key) for key in ("HF_DATASETS_CACHE", "HF_HOME", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_CACHE=str(cache / "datasets"), HF_HOME=str(cache), HF_DATASETS_OFFLINE="1",
                      HF_HUB_OFFLINE="1")
    import datasets.config  # read its environment at import: the in-process runs need the path set here

    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    yield dict(os.environ)
    patch.undo()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(TEXT, vocab_size=300, cache_dir=folder / "cache")
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(tokenizer.get_vocab_size(), 32, LAYERS, max_seq_len=128)
    with torch.no_grad():  # wide weights spread the exit confidences, so the threshold decides
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    model.eval().save_pretrained(folder / "m", tokenizer=tokenizer)
    return folder / "m", model, tokenizer


# -- the truth, by hand ---------------------------------------------------------------------
@torch.no_grad()
def by_hand_log_probs(model, ids, threshold):
    """log-softmax of each position at its exit layer: the first layer < L whose top-1
    probability reaches the threshold (every layer from 1 may exit), else the last."""
    logits = model(torch.tensor([ids[:-1]]), exit_layers=range(1, LAYERS + 1))
    rows, layers = [], []
    for t in range(len(ids) - 1):
        chosen = LAYERS
        if threshold is not None:
            for layer in range(1, LAYERS):
                if torch.softmax(logits[layer][0, t].double(), -1).max() >= threshold:
                    chosen = layer
                    break
        rows.append(torch.log_softmax(logits[chosen][0, t].double(), -1))
        layers.append(chosen)
    return torch.stack(rows), layers


def by_hand_score(model, tokenizer, context, continuation, threshold):
    head = tokenizer.encode(context).ids
    whole = tokenizer.encode(context + continuation).ids
    cont = whole[len(head):]
    log_probs, layers = by_hand_log_probs(model, whole, threshold)
    picked = log_probs[-len(cont):]
    return float(sum(picked[i, token] for i, token in enumerate(cont))), layers[-len(cont):]


def by_hand_results(model, tokenizer, threshold):
    correct, scored_layers = 0, []
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            score, layers = by_hand_score(model, tokenizer, doc["question"], " " + choice, threshold)
            scores.append(score)
            scored_layers += layers
        correct += max(range(len(scores)), key=lambda i: (scores[i], -i)) == doc["answer"]
    total_ll, words = 0.0, 0
    eot = tokenizer.token_to_id(END_OF_TEXT)
    for doc in DOCS:
        ids = [eot] + tokenizer.encode(doc["text"]).ids
        log_probs, layers = by_hand_log_probs(model, ids, threshold)
        total_ll += float(sum(log_probs[i, token] for i, token in enumerate(ids[1:])))
        scored_layers += layers
        words += len(doc["text"].split())
    generations = []
    for doc in DOCS:
        out = model.generate([tokenizer.encode(doc["prompt"]).ids], 4, routing_threshold=threshold)
        new = out.new_tokens[0].tolist()
        new = new[: new.index(eot)] if eot in new else new  # generation ends at the end-of-text token
        generations.append(tokenizer.decode(new, skip_special_tokens=False).split("\n")[0])
    return {"acc": correct / len(DOCS), "word_perplexity": math.exp(-total_ll / words),
            "generations": generations, "scored_layers": scored_layers}


# -- the tests --------------------------------------------------------------------------------
def evaluate(directory, model_args, monkeypatch):
    from ease.integrations import lm_eval as ease_lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task YAMLs name their data file from the repository root
    return ease_lm_eval.simple_evaluate(
        model_args=f"pretrained={directory}" + model_args,
        tasks=["ease_tiny_mc", "ease_tiny_ppl", "ease_tiny_gen"],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )


@pytest.mark.parametrize("threshold", [None, THRESHOLD], ids=["full-depth", "early-exit"])
def test_simple_evaluate_matches_the_scores_computed_by_hand(saved, offline, monkeypatch, threshold):
    directory, model, tokenizer = saved
    args = ",routing_threshold=none" if threshold is None else f",routing_threshold={threshold}"
    results = evaluate(directory, args, monkeypatch)
    truth = by_hand_results(model, tokenizer, threshold)
    assert results["results"]["ease_tiny_mc"]["acc,none"] == pytest.approx(truth["acc"])
    assert results["results"]["ease_tiny_ppl"]["word_perplexity,none"] == pytest.approx(truth["word_perplexity"], rel=1e-4)
    generated = [sample["filtered_resps"][0] for sample in sorted(results["samples"]["ease_tiny_gen"],
                                                                    key=lambda s: s["doc_id"])]
    assert generated == truth["generations"]
    stats = results["ease_early_exit"]
    mean = sum(truth["scored_layers"]) / len(truth["scored_layers"])
    assert stats["scored"]["tokens"] == len(truth["scored_layers"])
    assert stats["scored"]["mean_exit_layer"] == pytest.approx(mean)
    assert stats["scored"]["compute_saved"] == pytest.approx(1 - mean / LAYERS)
    if threshold is None:
        assert stats["mean_exit_layer"] == LAYERS and stats["compute_saved"] == 0
    else:
        assert 1 <= mean < LAYERS - 0.2  # the threshold made decisions
        assert stats["routing_threshold"] == THRESHOLD


def test_model_methods_directly(saved):
    from ease.integrations.lm_eval import EaseLM
    from lm_eval.api.instance import Instance

    directory, model, tokenizer = saved
    lm = EaseLM.create_from_arg_string(f"pretrained={directory},routing_threshold={THRESHOLD}")
    doc = DOCS[0]

    def request(kind, args):
        return Instance(request_type=kind, doc=doc, arguments=args, idx=0)

    (score, greedy), = lm.loglikelihood([request("loglikelihood", (doc["question"], " " + doc["choices"][0]))])
    expected, _ = by_hand_score(model, tokenizer, doc["question"], " " + doc["choices"][0], THRESHOLD)
    assert score == pytest.approx(expected, rel=1e-5)
    # A trailing space of the context moves into the continuation, as in lm-eval's own models.
    (moved, _), = lm.loglikelihood([request("loglikelihood", (doc["question"] + " ", doc["choices"][0]))])
    assert moved == pytest.approx(score, rel=1e-6)
    text, = lm.generate_until([request("generate_until", (doc["prompt"], {"until": ["o"], "max_gen_toks": 6}))])
    full = tokenizer.decode(model.generate([tokenizer.encode(doc["prompt"]).ids], 6, routing_threshold=THRESHOLD)
                            .new_tokens[0].tolist(), skip_special_tokens=False)
    assert text == full.split("o")[0]
    # Saved settings are the defaults; explicit model_args win.
    model.exit_settings = type(model.exit_settings)(routing_threshold=THRESHOLD)
    model.save_pretrained(directory.parent / "with-settings", tokenizer=tokenizer)
    assert EaseLM(pretrained=str(directory.parent / "with-settings")).rule.threshold == THRESHOLD
    assert EaseLM(pretrained=str(directory.parent / "with-settings"), routing_threshold="none").rule.threshold is None
    model.exit_settings = type(model.exit_settings)()
    with pytest.raises(ValueError, match="routing_threshold must be in"):
        EaseLM(pretrained=str(directory), routing_threshold=1.5)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        EaseLM(pretrained=str(directory), tokenizer=str(directory / "missing.json"))


def test_command_line_runs_with_the_ease_model(saved, offline, tmp_path):
    directory, model, tokenizer = saved
    command = [
        sys.executable, "-m", "ease.integrations.lm_eval", "--model", "ease",
        "--model_args", f"pretrained={directory},routing_threshold={THRESHOLD}",
        "--tasks", "ease_tiny_mc", "--include_path", str(TASKS), "--limit", "8",
        "--output_path", str(tmp_path / "results"),
    ]  # fmt: skip
    env = {**offline, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ease_tiny_mc" in done.stdout
    assert "ease early exit: mean exit layer" in done.stdout
    saved_results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    assert saved_results["ease_early_exit"]["scored"]["tokens"] > 0
