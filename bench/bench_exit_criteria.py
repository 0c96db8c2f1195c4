"""Which exit criterion makes generation fastest at a given agreement with full depth?

On the 12-layer deep-supervision model of ``bench/bench_generation.py`` (loaded from, or
trained into, ``--model-dir``), for each criterion of :data:`ease.exits.EXIT_CRITERIA`
(``max_prob``, ``margin``, ``saturation`` and ``classifier``, the last trained here with
:func:`ease.train_exit_classifier` on training windows):

1. **calibration**: on the first half of the held-out (validation) text, teacher-forced,
   every threshold of the criterion's grid is scored for its *agreement* (the fraction of
   tokens whose exit-layer prediction equals the last layer's) and its mean exit layer;
   for each target agreement (90%, 95%, 99%) :func:`ease.calibrate_threshold` with
   ``risk="agreement"`` and ``confidence=1 - delta`` picks the lowest threshold whose
   agreement reaches the target with probability ``1 - delta`` (Learn-then-Test); the
   plain empirical pick (lowest mean exit layer whose measured agreement reaches it) is
   reported beside it;
2. **check**: that threshold's realised agreement on the second half of the held-out text,
   against the target;
3. **speed**: greedy generation with it (8 prompts, 64 new tokens, batch 1 and 8), timed
   interleaved with full depth (and with self-speculation at a fixed and at an ``"auto"``
   draft depth) in the same run, with each generated token's *decision agreement* (full
   depth's choice after the same prefix, :func:`bench.bench_generation.decision_agreement`).

Run from the repository root: ``python -m bench.bench_exit_criteria [--quick]``. Results:
``bench/results/exit-criteria-cpu-<date>.{json,md}`` and the plot
``exit-criteria-cpu-<date>.png`` (speedup against decision agreement, one curve per
criterion and batch size).
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_generation import train_or_load
from bench.bench_generation import parse_args as generation_args
from bench.common import environment, markdown_table, write_results
from ease import calibrate_threshold
from ease.data import encode, load_text, make_batches, split_batch, split_tokens
from ease.exit_classifier import train_exit_classifier
from ease.depth_suite.measure import GRIDS
from ease.exits import EXIT_CRITERIA, ExitRule, first_exit_layer
from ease.generation.measure import decision_agreement, generate_all



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_exit_criteria", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="runs/bench_generation_model", help="as for bench.bench_generation")
    parser.add_argument("--targets", default="0.9,0.95,0.99", help="agreements to calibrate each criterion for")
    parser.add_argument("--confidence", type=float, default=0.9, help="1 - delta of the calibrated agreement bound")
    parser.add_argument("--min-exit-layer", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classifier-batches", type=int, default=60, help="training batches for the exit classifier")
    parser.add_argument("--draft", default="4x4", help="the fixed self-speculative setting ExK timed beside 'auto'")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 prompts, 8 tokens, one repeat")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.repeats, args.batch_sizes = 2, 8, 1, "1,2"
        args.classifier_batches, args.targets = 4, "0.9"
    return args


@torch.no_grad()
def sweep(model, batches, criteria, min_exit_layer: int) -> dict[str, list[dict[str, float]]]:
    """Teacher-forced agreement with the last layer and mean exit layer at every threshold of each grid."""
    num_layers = model.num_layers
    agree = {c: torch.zeros(len(GRIDS[c]), dtype=torch.float64) for c in criteria}
    layers = {c: torch.zeros(len(GRIDS[c]), dtype=torch.float64) for c in criteria}
    tokens = 0
    for batch in batches:
        inputs, _ = split_batch(batch)
        states = model.hidden_states(inputs, range(1, num_layers + 1))
        states[0] = model.embed(inputs)
        logits = {l: model.exit_head(states[l]) for l in range(1, num_layers + 1)}
        predictions = torch.stack([logits[l].argmax(-1).flatten() for l in range(1, num_layers + 1)])  # (L, N)
        final = predictions[-1]
        tokens += final.numel()
        for criterion in criteria:
            rule = ExitRule.for_model(model, None, min_exit_layer, criterion)
            scores = torch.stack([
                rule.score(logits[l], l, states[l], states[l - 1]).confidence.flatten()
                for l in range(min_exit_layer, num_layers)
            ])  # (m, N)
            grid = torch.tensor(GRIDS[criterion])[:, None, None]
            exit_layer = first_exit_layer(scores >= grid, min_exit_layer, num_layers, dim=1)  # (S, N)
            chosen = predictions.gather(0, exit_layer - 1)  # (S, N)
            agree[criterion] += (chosen == final).double().sum(1)
            layers[criterion] += exit_layer.double().sum(1)
    return {
        c: [{"threshold": t, "agreement": float(agree[c][i]) / tokens, "mean_exit_layer": float(layers[c][i]) / tokens}
            for i, t in enumerate(GRIDS[c])]
        for c in criteria
    }


def pick(points: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The point with the lowest mean exit layer whose agreement reaches ``target``."""
    passing = [p for p in points if p["agreement"] >= target]
    return min(passing, key=lambda p: (p["mean_exit_layer"], p["threshold"]), default=None)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Speedup against decision agreement, one curve per criterion and batch size (no pyplot)."""
    from matplotlib.figure import Figure

    batches = sorted({r["batch"] for r in rows})
    figure = Figure(figsize=(5.2 * len(batches), 4.2), layout="constrained")
    for i, batch in enumerate(batches):
        ax = figure.add_subplot(1, len(batches), i + 1)
        for criterion in EXIT_CRITERIA:
            points = sorted(
                (r["decision_agreement"], r["speedup"]) for r in rows
                if r["batch"] == batch and r["criterion"] == criterion
            )
            if points:
                ax.plot(*zip(*points), "o-", label=criterion)
        for r in rows:
            if r["batch"] == batch and r["mode"] == "self-speculative":
                ax.plot([1.0], [r["speedup"]], "*", ms=11, label=f"self-spec {r['setting']}")
        ax.axhline(1.0, color="black", lw=0.8, label="full depth")
        ax.set_xlabel("decision agreement with full depth (generated text)")
        ax.set_ylabel("speedup over full depth (tokens/s)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    gen_args = generation_args(["--model-dir", args.model_dir, "--prompts", str(args.prompts),
                                "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)])
    model, data, training = train_or_load(gen_args)
    num_layers = model.num_layers
    targets = [float(t) for t in args.targets.split(",") if t]
    notes: list[str] = []

    # The exit classifier, on training windows (the text before the validation split).
    started = time.perf_counter()
    train_ids, _ = split_tokens(encode(data.tokenizer, load_text(None)), val_fraction=0.1)
    train_batches = make_batches(train_ids, 16, gen_args.seq_len, shuffle=True, seed=0)[: args.classifier_batches]
    torch.manual_seed(0)
    classifier = train_exit_classifier(model, train_batches, epochs=1)
    classifier_seconds = time.perf_counter() - started
    print(f"exit classifier: {classifier.steps} steps, loss {classifier.first_loss:.3f} -> {classifier.final_loss:.3f} "
          f"({classifier_seconds:.0f} s)", flush=True)

    # Held-out text: the first half calibrates, the second checks.
    val_batches = data.val_batches
    half = len(val_batches) // 2
    calibration_batches, check_batches = val_batches[:half], val_batches[half:]
    criteria = list(EXIT_CRITERIA)
    calibration = sweep(model, calibration_batches, criteria, args.min_exit_layer)
    check = sweep(model, check_batches, criteria, args.min_exit_layer)
    chosen: dict[tuple[str, float], dict[str, float] | None] = {}
    empirical: dict[tuple[str, float], dict[str, float] | None] = {}
    bounded = "risk" in inspect.signature(calibrate_threshold).parameters
    for criterion in criteria:
        for target in targets:
            empirical[criterion, target] = pick(calibration[criterion], target)
            chosen[criterion, target] = empirical[criterion, target]
            if bounded:
                result = calibrate_threshold(
                    model, calibration_batches, 1 - target, thresholds=GRIDS[criterion],
                    min_exit_layer=args.min_exit_layer, exit_criterion=criterion,
                    confidence=args.confidence, risk="agreement",
                )
                chosen[criterion, target] = next(
                    (p for p in calibration[criterion] if p["threshold"] == result.threshold), None
                )
    if bounded:
        notes.append(
            f"Thresholds: calibrate_threshold(risk='agreement', confidence={args.confidence:g}) on the calibration "
            "half (Learn-then-Test: agreement >= target with probability >= confidence, tokens treated as "
            "independent); 'empirical threshold' is the plain pick on the same half."
        )
    else:
        notes.append(
            "calibrate_threshold(..., risk='agreement') has not landed: each threshold is the empirical pick on "
            "the calibration half (no confidence bound)."
        )

    # Prompts: windows spread over the validation stream (as bench_generation).
    val = data.val_ids.tolist()
    stride = (len(val) - args.prompt_len) // args.prompts
    prompts = [val[i * stride : i * stride + args.prompt_len] for i in range(args.prompts)]

    settings: list[tuple[str, str | None, float | None, dict, dict | None]] = [("full", None, None, {}, None)]
    for (criterion, target), point in chosen.items():
        if point is None:
            notes.append(f"{criterion}: no threshold of the grid is certified for {target:.0%} agreement on the "
                         "calibration half.")
            continue
        settings.append(("early exit", criterion, target, {
            "routing_threshold": point["threshold"], "min_exit_layer": args.min_exit_layer, "exit_criterion": criterion,
        }, point))
    layers_, tokens_ = (int(x) for x in args.draft.split("x"))
    settings.append(("self-speculative", None, None, {"draft_layers": layers_, "num_draft_tokens": tokens_}, None))
    settings.append(("self-speculative", None, None, {"draft_layers": "auto", "num_draft_tokens": tokens_}, None))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    cases = [(batch, *setting) for batch in batch_sizes for setting in settings]

    torch.set_num_threads(args.threads)
    outputs = {i: generate_all(model, prompts, case[0], args.new_tokens, case[4]) for i, case in enumerate(cases)}
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for repeat in range(args.repeats):  # interleaved: a slow spell of the machine hits every case
        for i, case in enumerate(cases):
            start = time.perf_counter()
            generate_all(model, prompts, case[0], args.new_tokens, case[4])
            times[i].append(time.perf_counter() - start)
        print(f"timing repeat {repeat + 1}/{args.repeats} done", flush=True)

    rows, baseline = [], {}
    for i, (batch, mode, criterion, target, options, point) in enumerate(cases):
        new = torch.cat([o.new_tokens for o in outputs[i]])
        exits = torch.cat([o.token_exit_layers for o in outputs[i]])
        seconds = statistics.median(times[i])
        rate = new.numel() / seconds
        if mode == "full":
            baseline[batch] = (rate, new)
        full_rate, full_new = baseline[batch]
        drafted = sum(o.draft_tokens for o in outputs[i])
        setting = "every layer"
        if mode == "early exit":
            setting = f"threshold {options['routing_threshold']:g}"
        elif mode == "self-speculative":
            setting = f"E={options['draft_layers']}, k={options['num_draft_tokens']}"
        realised = None
        if point is not None:
            realised = next(p for p in check[criterion] if p["threshold"] == point["threshold"])
        rows.append({
            "batch": batch, "mode": mode, "criterion": criterion, "target": target, "setting": setting,
            "tokens_per_s": rate, "speedup": rate / full_rate,
            "mean_exit_layer": float(exits.double().mean()),
            "decision_agreement": decision_agreement(model, prompts, new),
            "agreement": float((new == full_new).double().mean()),
            "calibration_agreement": None if point is None else point["agreement"],
            "empirical_threshold": (empirical[criterion, target] or {}).get("threshold") if point is not None else None,
            "held_out_agreement": None if realised is None else realised["agreement"],
            "held_out_mean_exit_layer": None if realised is None else realised["mean_exit_layer"],
            "acceptance": sum(o.accepted_draft_tokens for o in outputs[i]) / drafted if drafted else None,
            "blocks_per_token": sum(o.block_evaluations for o in outputs[i]) / (new.shape[0] * max(1, new.shape[1] - 1)),
            "seconds": seconds, "seconds_min": min(times[i]), "seconds_max": max(times[i]),
            "options": options,
        })

    columns = [
        ("batch", "batch"), ("mode", "mode"), ("criterion", "criterion"), ("target", "target agreement"),
        ("setting", "setting"), ("empirical_threshold", "empirical threshold"), ("tokens_per_s", "tokens/s"), ("speedup", "speedup"),
        ("mean_exit_layer", "mean exit layer"), ("held_out_agreement", "held-out agreement"),
        ("decision_agreement", "decision agreement"), ("agreement", "agreement"),
        ("acceptance", "draft acceptance"), ("blocks_per_token", "blocks/token"),
    ]
    print()
    print(markdown_table(rows, columns))
    missed = [r for r in rows if r["target"] is not None and r["held_out_agreement"] < r["target"]]
    notes += [
        f"Model: DeepSupervisionTransformer, {num_layers} layers, dim {model.config.dim}, vocab {model.vocab_size}, "
        f"trained {training.get('epochs', '?')} epochs ({training.get('train_seconds', 0):.0f} s on "
        f"{training.get('train_device', '?')}); val accuracy {training.get('val_accuracy', float('nan')):.3f}.",
        f"Exit classifier: {classifier.steps} AdamW steps on training windows, BCE {classifier.first_loss:.3f} -> "
        f"{classifier.final_loss:.3f} ({classifier_seconds:.0f} s).",
        f"Calibration on {half} held-out batches (teacher-forced agreement with the last layer); "
        f"'held-out agreement' is the same measure on the other "
        f"{len(check_batches)} batches. Below target there: "
        + (", ".join(f"{r['criterion']}@{r['target']:g} (batch {r['batch']}): {r['held_out_agreement']:.3f}" for r in missed)
           or "none") + ".",
        f"Timing: CPU, {args.threads} thread(s), greedy, {args.prompts} prompts of {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, min_exit_layer {args.min_exit_layer}, median of {args.repeats} interleaved "
        "repeats, speedup against full depth at the same batch size in the same run.",
    ]
    print()
    for note in notes:
        print("-", note)
    env = environment("cpu")
    meta = {
        "environment": env,
        "command": "python -m bench.bench_exit_criteria " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args),
        "training": training,
        "classifier": {"steps": classifier.steps, "first_loss": classifier.first_loss,
                       "final_loss": classifier.final_loss, "seconds": classifier_seconds},
        "calibration_sweep": calibration,
        "held_out_sweep": check,
        "prompts": prompts,
    }
    name = "exit-criteria-quick" if args.quick else "exit-criteria"
    json_path, md_path = write_results(name, rows, meta, args.out, columns=columns, notes=notes)
    try:
        plot_path = Path(args.out) / f"{name}-{env['device_slug']}-{env['date'][:10]}.png"
        plot(rows, plot_path, f"Exit criteria, {num_layers}-layer deep-supervision model (CPU)")
        print(f"wrote {plot_path}")
    except ImportError as error:
        print(f"no plot: {error}")
    print(f"wrote {json_path} and {md_path}")
    return {"rows": rows, "notes": notes}


if __name__ == "__main__":
    main()
