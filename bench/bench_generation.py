"""Does early exit make generation faster, and at what cost in agreement with full depth?

On a deep-supervision model (12 layers by default) trained on the built-in corpus, this
times greedy generation on the CPU, batch 1 (and a batch of all prompts), for:

- ``full``: every block for every token (the baseline, timed in the same run);
- ``early exit``: confident early exit with state propagation at several thresholds
  (including the one :func:`ease.calibrate_threshold` picks for a 1-point accuracy drop);
- ``self-speculative``: draft with the first ``E`` blocks, verify with the rest (lossless).

Each row reports tokens/s (median over interleaved repeats), the speedup over full depth at
the same batch size, the mean exit layer, and two agreements with full depth:

- ``agreement``: the fraction of generated positions whose token equals the token that
  full-depth greedy decoding puts there. A single early disagreement changes the context of
  every later token, so this counts the divergence that follows it too;
- ``decision agreement``: the fraction of generated tokens that full depth would also have
  chosen given the same (generated) prefix, checked by one full forward pass: how often an
  exit decision itself was wrong.

``blocks/token`` is the compute decoding spent per token after the first, in blocks run on
one token position (``GenerationOutput.block_evaluations``; a verification pass counts every
position it checks, a rejected draft included); ``draft acceptance`` is accepted over
drafted tokens.

The model is trained once (on CUDA when there is one, else on the CPU, within
``--train-minutes``) and saved to ``--model-dir`` with its tokenizer; later runs load it.

Run from the repository root: ``python -m bench.bench_generation [--quick] [--retrain]``.
Results: ``bench/results/generation-cpu-<date>.{json,md}`` and the calibration plot
``generation-calibration-cpu-<date>.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tokenizers import Tokenizer

from bench.common import environment, markdown_table, write_results
from ease import DeepSupervisionTransformer, Trainer, calibrate_threshold, create_deep_supervision_config, load_model
from ease.data import encode, load_data, load_text, make_batches, set_seed, split_tokens
from ease.generation.measure import decision_agreement, generate_all

TARGET_EARLY_EXIT_SPEEDUP = 2.0
TARGET_EARLY_EXIT_AGREEMENT = 0.90
TARGET_SPECULATIVE_SPEEDUP = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_generation", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # every option shows its default
    )
    model = parser.add_argument_group("the model (trained once, then loaded from --model-dir)")
    model.add_argument("--model-dir", default="runs/bench_generation_model", help="where the model is saved/loaded")
    model.add_argument("--retrain", action="store_true", help="train even if --model-dir holds a model")
    model.add_argument("--layers", type=int, default=12, help="number of transformer blocks")
    model.add_argument("--dim", type=int, default=128, help="model width")
    model.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary of the built-in corpus")
    model.add_argument("--seq-len", type=int, default=128, help="training window (prompt + new tokens fit in it)")
    model.add_argument("--batch-size", type=int, default=16, help="training batch size (windows per step)")
    model.add_argument("--lr", type=float, default=2e-3, help="training learning rate")
    model.add_argument("--max-epochs", type=int, default=20, help="most training epochs (early stopping may end sooner)")
    model.add_argument("--train-minutes", type=float, default=3.0, help="training stops after the epoch that passes this")
    model.add_argument("--train-device", default="auto", help="auto (cuda if present), cpu or cuda")
    timing = parser.add_argument_group("what is timed")
    timing.add_argument("--prompts", type=int, default=8, help="validation prompts")
    timing.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    timing.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    timing.add_argument("--thresholds", default="0.2,0.3,0.5,0.7,0.9,0.95",
                        help="comma-separated routing thresholds of the early-exit rows")
    timing.add_argument("--min-exit-layers", default="1,2,4", help="min_exit_layer values for the early-exit rows")
    timing.add_argument("--draft", default="3x4,4x4,6x4,3x8@0.3,4x8@0.3,6x8@0.3",
                        help="self-speculative settings ExK (draft layers x tokens), ExK@t with draft_threshold t")
    timing.add_argument("--batched-min-exit-layer", type=int, default=2,
                        help="batches larger than 1 time full depth, self-speculation and early exit at this min layer only")
    timing.add_argument("--batch-sizes", default="1,8", help="1 = each prompt alone; n = the prompts in batches of n")
    timing.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (median)")
    timing.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing")
    timing.add_argument("--max-accuracy-drop", type=float, default=0.01, help="for the calibrated threshold row")
    timing.add_argument("--quick", action="store_true",
                        help="few prompts, tokens and settings (a smoke test): 2 prompts, 16 tokens, 1 repeat")
    parser.add_argument("--out", default="bench/results", help="folder of the markdown and JSON results")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.repeats = 2, 16, 1
        args.thresholds, args.min_exit_layers, args.batch_sizes = "0.8", "2", "1,2"
        args.draft = f"{max(1, args.layers // 3)}x4,{max(1, args.layers // 3)}x8@0.3"
    return args


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def corpus_fingerprint(text: str) -> str:
    """The built-in corpus is the running CPython's documentation: it differs between versions."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_or_load(args: argparse.Namespace) -> tuple[DeepSupervisionTransformer, Any, dict[str, Any]]:
    """The benchmark model and its data: loaded from ``--model-dir`` or trained and saved there.

    A loaded model comes with the tokenizer saved beside it, and the validation data is
    encoded with that tokenizer (a tokenizer trained here on another Python's corpus would
    number the tokens differently).
    """
    directory = Path(args.model_dir)
    info_path = directory / "training.json"
    text = load_text(None)
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file() and not args.retrain:
        model = load_model(directory)
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        _, val_ids = split_tokens(encode(tokenizer, text), val_fraction=0.1)
        data = SimpleNamespace(
            tokenizer=tokenizer, val_ids=val_ids, vocab_size=tokenizer.get_vocab_size(),
            val_batches=make_batches(val_ids, args.batch_size, args.seq_len, shuffle=False, drop_last=False),
        )
        if model.config.vocab_size != data.vocab_size:
            raise SystemExit(f"{directory}: model vocab {model.config.vocab_size} != tokenizer vocab {data.vocab_size}")
        info["corpus_matches_training"] = info.get("corpus_sha256_16") == corpus_fingerprint(text)
        print(f"loaded {directory} ({info.get('epochs', '?')} epochs; same corpus as in training: "
              f"{info['corpus_matches_training']})", flush=True)
        return model.eval(), data, info

    data = load_data(vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
    device = torch.device("cuda" if args.train_device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.train_device == "auto" else args.train_device))
    set_seed(0)
    model = DeepSupervisionTransformer(
        data.vocab_size, args.dim, args.layers, max_seq_len=max(args.seq_len, args.prompt_len + args.new_tokens)
    ).to(device)
    trainer = Trainer(create_deep_supervision_config(args.layers, verbose=False), vocab_size=data.vocab_size)
    optimizer = trainer.create_optimizer(model, base_lr=args.lr)
    start = time.perf_counter()
    history, best_loss, best_state, stale = [], math.inf, None, 0
    # Early stopping on the validation loss (patience 2, best state restored), within a time budget.
    for epoch in range(1, args.max_epochs + 1):
        loss = trainer.train_epoch(model, data.train_batches, optimizer)
        val_loss = trainer.evaluate(model, data.val_batches)["loss"]
        history.append({"epoch": epoch, "train_loss": loss, "val_loss": val_loss})
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch}: train loss {loss:.3f}, val loss {val_loss:.3f} ({elapsed:.0f} s on {device})", flush=True)
        if val_loss < best_loss:
            best_loss, stale = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if stale >= 2 or elapsed > 60 * args.train_minutes:
            break
    model.load_state_dict(best_state)
    evaluation = trainer.evaluate(model, data.val_batches)
    info = {
        "epochs": len(history),
        "history": history,
        "train_seconds": time.perf_counter() - start,
        "train_device": str(device),
        "val_loss": evaluation["loss"],
        "val_accuracy": evaluation["accuracy"],
        "val_layer_accuracy": {str(l): v["accuracy"] for l, v in evaluation["layers"].items()},
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "python": platform.python_version(),
        "corpus_sha256_16": corpus_fingerprint(text),
    }
    model = model.cpu().eval()
    model.save_pretrained(directory)
    data.tokenizer.save(str(directory / "tokenizer.json"))
    info_path.write_text(json.dumps(info, indent=2))
    print(f"saved {directory}: val loss {info['val_loss']:.3f}, accuracy {info['val_accuracy']:.3f}", flush=True)
    return model, data, info


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, data, training = train_or_load(args)
    num_layers = model.num_layers

    # Calibrated threshold (teacher-forced, on the validation batches).
    calibration = calibrate_threshold(model, data.val_batches, args.max_accuracy_drop, min_exit_layer=2)
    print(
        f"calibrated threshold (drop <= {args.max_accuracy_drop}, min_exit_layer 2): {calibration.threshold}; "
        f"full-depth val accuracy {calibration.full_depth_accuracy:.3f}",
        flush=True,
    )

    # Prompts: windows spread over the validation stream.
    val = data.val_ids.tolist()
    stride = (len(val) - args.prompt_len) // args.prompts
    prompts = [val[i * stride : i * stride + args.prompt_len] for i in range(args.prompts)]

    settings: list[tuple[str, str, dict]] = [("full", "every layer", {})]
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    if calibration.threshold is not None and calibration.threshold not in thresholds:
        thresholds.append(calibration.threshold)
    for min_exit in (int(m) for m in args.min_exit_layers.split(",") if m):
        for threshold in sorted(thresholds):
            mark = " (calibrated)" if threshold == calibration.threshold and min_exit == 2 else ""
            settings.append((
                "early exit", f"threshold {threshold:g}, min layer {min_exit}{mark}",
                {"routing_threshold": threshold, "min_exit_layer": min_exit},
            ))
    for spec in (s for s in args.draft.split(",") if s):
        shape, _, cutoff = spec.lower().partition("@")
        layers, tokens = (int(x) for x in shape.split("x"))
        options = {"draft_layers": layers, "num_draft_tokens": tokens}
        label = f"E={layers}, k={tokens}"
        if cutoff:
            options["draft_threshold"] = float(cutoff)
            label += f", draft threshold {float(cutoff):g}"
        settings.append(("self-speculative", label, options))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]

    torch.set_num_threads(args.threads)
    cases = [
        (batch, mode, setting, options)
        for batch in batch_sizes
        for mode, setting, options in settings
        if batch == 1 or mode != "early exit" or options["min_exit_layer"] == args.batched_min_exit_layer
    ]
    outputs: dict[int, list] = {}
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for i, (batch, _, _, options) in enumerate(cases):  # warm-up, and the outputs
        outputs[i] = generate_all(model, prompts, batch, args.new_tokens, options)
    for repeat in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every case
        for i, (batch, _, _, options) in enumerate(cases):
            start = time.perf_counter()
            generate_all(model, prompts, batch, args.new_tokens, options)
            times[i].append(time.perf_counter() - start)
        print(f"timing repeat {repeat + 1}/{args.repeats} done", flush=True)

    rows = []
    baseline: dict[int, tuple[float, torch.Tensor]] = {}
    for i, (batch, mode, setting, options) in enumerate(cases):
        new = torch.cat([o.new_tokens for o in outputs[i]])
        exits = torch.cat([o.token_exit_layers for o in outputs[i]])
        seconds = statistics.median(times[i])
        tokens_per_s = new.numel() / seconds
        if mode == "full":
            baseline[batch] = (tokens_per_s, new)
        full_rate, full_new = baseline[batch]
        drafted = sum(o.draft_tokens for o in outputs[i])
        row = {
            "batch": batch,
            "mode": mode,
            "setting": setting,
            "tokens_per_s": tokens_per_s,
            "speedup": tokens_per_s / full_rate,
            "mean_exit_layer": float(exits.double().mean()),
            "agreement": float((new == full_new).double().mean()),
            "decision_agreement": decision_agreement(model, prompts, new),
            "identical": bool(torch.equal(new, full_new)),
            "acceptance": sum(o.accepted_draft_tokens for o in outputs[i]) / drafted if drafted else None,
            "blocks_per_token": sum(o.block_evaluations for o in outputs[i]) / (new.shape[0] * max(1, new.shape[1] - 1)),
            "seconds": seconds,
            "seconds_min": min(times[i]),
            "seconds_max": max(times[i]),
            "options": options,
        }
        rows.append(row)

    columns = [
        ("batch", "batch"), ("mode", "mode"), ("setting", "setting"), ("tokens_per_s", "tokens/s"),
        ("speedup", "speedup"), ("mean_exit_layer", "mean exit layer"), ("agreement", "agreement"),
        ("decision_agreement", "decision agreement"), ("identical", "identical"),
        ("acceptance", "draft acceptance"), ("blocks_per_token", "blocks/token"),
    ]
    print()
    print(markdown_table(rows, columns))

    # The targets, judged at batch 1.
    single = [r for r in rows if r["batch"] == 1]
    exit_ok = [r for r in single if r["mode"] == "early exit" and r["agreement"] >= TARGET_EARLY_EXIT_AGREEMENT]
    best_exit = max(exit_ok, key=lambda r: r["speedup"], default=None)
    exit_decision_ok = [r for r in single if r["mode"] == "early exit" and r["decision_agreement"] >= TARGET_EARLY_EXIT_AGREEMENT]
    best_exit_decision = max(exit_decision_ok, key=lambda r: r["speedup"], default=None)
    spec = [r for r in single if r["mode"] == "self-speculative"]
    best_spec = max(spec, key=lambda r: r["speedup"], default=None)
    notes = [
        f"Model: DeepSupervisionTransformer, {num_layers} layers, dim {model.config.dim}, vocab {model.vocab_size}, "
        f"trained {training.get('epochs', '?')} epochs ({training.get('train_seconds', 0):.0f} s on {training.get('train_device', '?')}); "
        f"val accuracy {calibration.full_depth_accuracy:.3f} at full depth; per-layer val accuracy "
        + ", ".join(f"{l}: {a:.3f}" for l, a in calibration.layer_accuracy.items()) + ".",
        f"Timing: CPU, {args.threads} thread(s), greedy, {args.prompts} validation prompts of {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens each, median of {args.repeats} interleaved repeats; speedup against full depth "
        "at the same batch size in the same run.",
        f"Calibrated threshold (teacher-forced, max drop {args.max_accuracy_drop}, min_exit_layer 2): {calibration.threshold}.",
    ]
    if training.get("corpus_matches_training") is False:
        trained_under = f"Python {training['python']}" if "python" in training else "another Python"
        notes.append(
            f"The model was trained under {trained_under}, whose documentation (the built-in corpus) differs from "
            f"this Python {platform.python_version()}'s; the tokenizer saved with the model encodes this corpus, "
            "and the prompts and validation data come from it."
        )
    if best_exit is not None:
        notes.append(
            f"Early exit, best speedup with agreement >= {TARGET_EARLY_EXIT_AGREEMENT:.0%} (batch 1): {best_exit['setting']}: "
            f"{best_exit['speedup']:.2f}x, agreement {best_exit['agreement']:.1%}, mean exit layer {best_exit['mean_exit_layer']:.2f} "
            f"(target >= {TARGET_EARLY_EXIT_SPEEDUP}x: {'met' if best_exit['speedup'] >= TARGET_EARLY_EXIT_SPEEDUP else 'MISSED'})."
        )
    else:
        notes.append(f"Early exit: no threshold reached {TARGET_EARLY_EXIT_AGREEMENT:.0%} agreement (target MISSED).")
    if best_exit_decision is not None:
        notes.append(
            f"Early exit, best speedup with decision agreement >= {TARGET_EARLY_EXIT_AGREEMENT:.0%} (batch 1): "
            f"{best_exit_decision['setting']}: {best_exit_decision['speedup']:.2f}x, decision agreement "
            f"{best_exit_decision['decision_agreement']:.1%}, agreement {best_exit_decision['agreement']:.1%}."
        )
    if best_spec is not None:
        notes.append(
            f"Self-speculative, best (batch 1): {best_spec['setting']}: {best_spec['speedup']:.2f}x, identical output: "
            f"{all(r['identical'] for r in spec)} for every setting (target >= {TARGET_SPECULATIVE_SPEEDUP}x: "
            f"{'met' if best_spec['speedup'] >= TARGET_SPECULATIVE_SPEEDUP else 'MISSED'})."
        )
    print()
    for note in notes:
        print("-", note)

    env = environment("cpu")
    meta = {
        "environment": env,
        "command": "python -m bench.bench_generation " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items()},
        "model": {"num_layers": num_layers, "dim": model.config.dim, "vocab_size": model.vocab_size,
                  "num_heads": model.config.num_heads, "ffn_dim": model.config.ffn_dim},
        "training": training,
        "calibration": calibration.to_dict(),
        "targets": {
            "early_exit_speedup": TARGET_EARLY_EXIT_SPEEDUP,
            "early_exit_agreement": TARGET_EARLY_EXIT_AGREEMENT,
            "speculative_speedup": TARGET_SPECULATIVE_SPEEDUP,
        },
        "prompts": prompts,
    }
    name = "generation-quick" if args.quick else "generation"
    json_path, md_path = write_results(name, rows, meta, args.out, columns=columns, notes=notes)
    try:
        plot_path = Path(args.out) / f"{name}-calibration-{env['device_slug']}-{env['date'][:10]}.png"
        calibration.plot(plot_path, title=f"Threshold calibration, {num_layers}-layer deep-supervision model")
        print(f"wrote {plot_path}")
    except ImportError as error:
        print(f"no calibration plot: {error}")
    print(f"wrote {json_path} and {md_path}")
    return {"rows": rows, "notes": notes}


if __name__ == "__main__":
    main()
