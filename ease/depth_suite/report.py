"""The depth suite's ``results.md`` and figures, from its ``results.json`` dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ease._io import atomic_path
from ease.exits import EXIT_CRITERIA

__all__ = ["best_early_exit", "layer_figures", "plot_suite", "suite_table"]


def best_early_exit(rows: list[dict[str, Any]], batch: int, agreement: float) -> dict[str, Any] | None:
    """The fastest early-exit row at ``batch`` whose decision agreement reaches ``agreement``."""
    passing = [r for r in rows if r["batch"] == batch and r["mode"] == "early exit" and r["decision_agreement"] >= agreement]
    return max(passing, key=lambda r: r["speedup"], default=None)


def layer_figures(run: dict[str, Any]) -> dict[int, dict[str, float]]:
    """A recipe's ``{layer: {"loss", "accuracy"}}`` with int keys (JSON turns them into strings)."""
    return {int(layer): figures for layer, figures in run["layers"].items()}


def _row(rows: list[dict[str, Any]], batch: int, mode: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["batch"] == batch and r["mode"] == mode), None)


def _speed_cell(row: dict[str, Any] | None, with_setting: bool = True) -> str:
    if row is None:
        return "none ≥ 90%"
    cell = f"{row['speedup']:.2f}x"
    if with_setting and row["mode"] == "early exit":
        cell += f" ({row['criterion']} τ={row['threshold']:g}, {row['decision_agreement']:.0%}, L̄={row['mean_exit_layer']:.1f})"
    elif row["mode"] == "self-speculative":
        cell += " (identical)" if row["output_agreement"] == 1.0 else f" (output agreement {row['output_agreement']:.3f})"
    return cell


def suite_table(results: dict[str, Any]) -> str:
    """Markdown: the summary table (one row per recipe), then each recipe's timed settings."""
    recipes = results["recipes"]
    num_layers = results["settings"]["num_layers"]
    standard = layer_figures(recipes["standard"])[num_layers] if "standard" in recipes else None
    batches = results["settings"]["batch_sizes"]
    speed_columns = "".join(f" batch {b} early exit | batch {b} self-spec |" for b in batches)
    env, settings, data = results["environment"], results["settings"], results["data"]
    machine = env.get("gpu") or f"{env['machine']} CPU, {env['cpu_count']} cores, {env['threads']} torch thread(s)"
    lines = [
        "# Depth suite", "",
        f"- date: {env['date']}; machine: {machine}; python {env['python']}, torch {env['torch']}",
        f"- data: {settings['corpus']} corpus, {data['train_tokens']:,} training and {data['val_tokens']:,} validation "
        f"tokens, {data['vocab_size']}-token BPE",
        f"- model: {settings['num_layers']} layers, dim {settings['dim']}, {settings['num_heads']} heads; "
        f"{settings['max_steps']} steps of {settings['batch_size']} x {settings['seq_len']} tokens per recipe "
        f"(lr {settings['lr']:g}, cosine, seed {settings['seed']})",
        f"- generation: {settings['prompts']} held-out prompts of {settings['prompt_len']} tokens, "
        f"{settings['new_tokens']} new tokens, greedy, min_exit_layer {settings['min_exit_layer']}, median of "
        f"{settings['repeats']} interleaved repeats",
    ]
    if settings.get("extra", {}).get("command"):
        lines.append(f"- command: `{settings['extra']['command']}`")
    if "seconds" in results:
        lines.append(f"- wall time of the run: {results['seconds'] / 60:.1f} min")
    lines += [
        "",
        "| recipe | final-layer acc | vs standard | final-layer loss | mean exit layer at 90% (max_prob, held out) |"
        + speed_columns + " train time |",
        "| --- | ---: | ---: | ---: | ---: |" + " --- | --- |" * len(batches) + " ---: |",
    ]
    for name, run in recipes.items():
        final = layer_figures(run)[num_layers]
        delta = "" if standard is None else f"{100 * (final['accuracy'] - standard['accuracy']):+.1f} pt"
        certified = run["criteria"]["max_prob"]["certified"].get("0.9") or {}
        depth = certified.get("held_out_mean_exit_layer")
        depth_cell = "none certified" if depth is None else (
            f"{depth:.2f} (τ={certified['threshold']:g}, agreement {certified['held_out_agreement']:.3f})")
        rows = run["generation"]
        lines.append(
            f"| {name} | {final['accuracy']:.3f} | {delta} | {final['loss']:.3f} | {depth_cell} | "
            + "".join(f"{_speed_cell(best_early_exit(rows, b, 0.9))} | {_speed_cell(_row(rows, b, 'self-speculative'))} | "
                      for b in batches)
            + f"{run['training']['train_seconds']:.0f} s |"
        )
    lines += ["", "Speed-ups are tokens/s against full depth at the same batch size, timed interleaved in the same "
              "run; early exit is the fastest certified setting whose generated tokens agree with full depth's "
              "greedy choice at least 90% of the time (τ: threshold, L̄: mean exit layer)."]
    for name, run in recipes.items():
        lines += ["", f"### {name}", "",
                  "| batch | mode | criterion | target | threshold | tokens/s | speed-up | mean exit layer | "
                  "decision agreement | output = full depth | draft acceptance |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in run["generation"]:
            accept = "" if r["draft_acceptance"] is None else f"{r['draft_acceptance']:.2f}"
            lines.append(
                f"| {r['batch']} | {r['mode']} | {r['criterion'] or ''} | {r['target'] or ''} | "
                f"{'' if r['threshold'] is None else format(r['threshold'], 'g')} | {r['tokens_per_s']:.0f} | "
                f"{r['speedup']:.2f}x | {r['mean_exit_layer']:.2f} | {r['decision_agreement']:.3f} | "
                f"{r['output_agreement']:.3f} | {accept} |"
            )
        held = []
        for criterion, entry in run["criteria"].items():
            for target, cert in entry["certified"].items():
                if cert["threshold"] is None:
                    held.append(f"{criterion}@{target}: none certified")
                else:
                    held.append(f"{criterion}@{target}: τ={cert['threshold']:g} → held-out agreement "
                                f"{cert['held_out_agreement']:.3f}, mean exit layer {cert['held_out_mean_exit_layer']:.2f}")
        lines += ["", "Certified thresholds (Learn-then-Test, agreement ≥ target with probability ≥ "
                  f"{results['settings']['confidence']:g}): " + "; ".join(held) + "."]
    return "\n".join(lines) + "\n"


def plot_suite(results: dict[str, Any], out: Path) -> list[Path]:
    """``per_layer.png``, ``exit_tradeoff.png``, ``generation_speed.png``,
    ``criteria_speed.png`` and ``final_layer_cost.png``; nothing when matplotlib is absent."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install 'ease[plots]')")
        return []
    recipes = results["recipes"]
    num_layers = results["settings"]["num_layers"]
    colors = {name: f"C{i}" for i, name in enumerate(recipes)}
    written = []

    figure = Figure(figsize=(10, 4), layout="constrained")
    accuracy_ax, loss_ax = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for name, run in recipes.items():
        layers = sorted(layer_figures(run).items())
        accuracy_ax.plot([l for l, _ in layers], [v["accuracy"] for _, v in layers], "o-", ms=3, color=colors[name], label=name)
        loss_ax.plot([l for l, _ in layers], [v["loss"] for _, v in layers], "o-", ms=3, color=colors[name], label=name)
    for ax, label in ((accuracy_ax, "validation accuracy"), (loss_ax, "validation loss (nats/token)")):
        ax.set_xlabel("exit layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    accuracy_ax.legend(fontsize=7)
    figure.suptitle("quality of every layer's exit, per recipe")
    written.append(_save(figure, out / "per_layer.png"))

    figure = Figure(figsize=(11, 8), layout="constrained")
    for i, criterion in enumerate(EXIT_CRITERIA):
        ax = figure.add_subplot(2, 2, i + 1)
        for name, run in recipes.items():
            sweep = run["criteria"][criterion]["sweep"]
            ax.plot([p["mean_exit_layer"] for p in sweep], [p["accuracy"] for p in sweep], "o-", ms=3,
                    color=colors[name], label=name)
        ax.set_title(f"criterion: {criterion}")
        ax.set_xlabel("mean exit layer")
        ax.set_ylabel("next-token accuracy")
        ax.set_xlim(0.5, num_layers + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle("accuracy against mean exit layer (threshold sweep, held-out text, teacher-forced)")
    written.append(_save(figure, out / "exit_tradeoff.png"))

    batches = results["settings"]["batch_sizes"]
    figure = Figure(figsize=(5.5 * len(batches), 4.3), layout="constrained")
    for i, batch in enumerate(batches):
        ax = figure.add_subplot(1, len(batches), i + 1)
        for name, run in recipes.items():
            rows = [r for r in run["generation"] if r["batch"] == batch]
            exits = sorted((r["decision_agreement"], r["speedup"]) for r in rows if r["mode"] == "early exit")
            if exits:
                ax.plot(*zip(*exits), "o", color=colors[name], label=f"{name} early exit")
            for r in rows:
                if r["mode"] == "self-speculative":
                    ax.plot([r["decision_agreement"]], [r["speedup"]], "*", ms=12, color=colors[name],
                            markeredgecolor="black", label=f"{name} self-spec")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axvline(0.9, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("decision agreement with full depth (generated tokens)")
        ax.set_ylabel("tokens/s over full depth (same run)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    figure.suptitle("measured generation speed against agreement")
    written.append(_save(figure, out / "generation_speed.png"))

    figure = Figure(figsize=(3.2 * len(recipes), 3.0 * len(batches)), layout="constrained")
    for i, batch in enumerate(batches):
        for j, (name, run) in enumerate(recipes.items()):
            ax = figure.add_subplot(len(batches), len(recipes), i * len(recipes) + j + 1)
            rows = [r for r in run["generation"] if r["batch"] == batch]
            for k, criterion in enumerate(EXIT_CRITERIA):
                points = sorted((r["decision_agreement"], r["speedup"]) for r in rows if r["criterion"] == criterion)
                if points:
                    ax.plot(*zip(*points), "o-", ms=4, color=f"C{k}", label=criterion)
            for r in rows:
                if r["mode"] == "self-speculative":
                    ax.plot([r["decision_agreement"]], [r["speedup"]], "*", ms=11, color="black", label="self-spec")
            ax.axhline(1.0, color="black", lw=0.6)
            ax.set_title(f"{name}, batch {batch}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == len(batches) - 1:
                ax.set_xlabel("decision agreement", fontsize=7)
            if j == 0:
                ax.set_ylabel("speed-up over full depth", fontsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    figure.suptitle("speed against agreement, one curve per exit criterion (thresholds certified for each target)")
    written.append(_save(figure, out / "criteria_speed.png"))

    standard = recipes.get("standard")
    if standard is not None:
        base = layer_figures(standard)[num_layers]
        names = [n for n in recipes if n != "standard"]
        figure = Figure(figsize=(6, 3.6), layout="constrained")
        ax = figure.add_subplot(1, 1, 1)
        deltas = [100 * (layer_figures(recipes[n])[num_layers]["accuracy"] - base["accuracy"]) for n in names]
        ax.bar(names, deltas, color=[colors[n] for n in names])
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(-1, color="grey", lw=0.6, ls="--", label="1 point below standard")
        ax.set_ylabel("final-layer accuracy − standard's (points)")
        ax.set_title("what each recipe costs the last layer")
        ax.legend(fontsize=7)
        written.append(_save(figure, out / "final_layer_cost.png"))
    return written


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    return path
