"""Generate text from a saved model: ``python -m ease.cli.generate`` (or ``ease-generate``).

    python -m ease.cli.generate --model runs/experiments/models/deep_supervision \\
        --prompt "The built-in function" --threshold 0.9 --max-new-tokens 50

Loads a folder written by ``save_pretrained`` and a tokenizer (``tokenizer.json`` in that
folder unless ``--tokenizer`` names one), generates with early exit (``--threshold``),
self-speculation (``--draft-layers``) or at full depth (``--full-depth``), and prints the
text and the mean exit layer. Options left out take the model's saved exit settings
(``model.exit_settings``); a model saved without any runs at full depth. ``--prompt-ids`` takes token ids instead of text and needs no
tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ease.generation.api import exit_arguments
from ease.models import TOKENIZER_NAME, UNSET, load_model


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m ease.cli.generate", description=__doc__.split("\n\n")[0].split(": ")[0] + "."
    )
    parser.add_argument("--model", required=True, help="folder written by save_pretrained")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-ids", help="the prompt as token ids separated by spaces or commas")
    parser.add_argument("--tokenizer", default=None,
                        help=f"a tokenizers JSON file (default: {TOKENIZER_NAME} in the model folder)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="routing threshold in (0, 1] for confident early exit (default: the model's "
                             "saved setting, else full depth)")
    parser.add_argument("--min-exit-layer", type=int, default=None,
                        help="no token exits before this layer (default: the model's saved setting, else 1)")
    parser.add_argument("--draft-layers", type=int, default=None,
                        help="self-speculative decoding with this many draft layers (lossless; default: the "
                             "model's saved setting when it has no threshold)")
    parser.add_argument("--full-depth", action="store_true",
                        help="ignore the model's saved early-exit settings: every token runs every layer")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="tokens drafted per verification")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--show-exits", action="store_true", help="also print every new token with its exit layer")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def _load_tokenizer(model_dir: Path, path: str | None):
    from tokenizers import Tokenizer

    file = Path(path) if path is not None else model_dir / TOKENIZER_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {file}: pass --tokenizer PATH, or --prompt-ids to give token ids"
        )
    return Tokenizer.from_file(str(file))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by spaces or commas, got {text!r}") from None


def _finite_or_none(value: float) -> float | None:
    """``value``, or None where it is undefined (NaN, as the mean of no tokens): JSON has no NaN."""
    return value if math.isfinite(value) else None


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0, or 2 on a bad argument or file)."""
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.model, map_location=args.device)
        tokenizer = None
        if args.prompt is not None or args.tokenizer is not None:
            tokenizer = _load_tokenizer(Path(args.model), args.tokenizer)
        prompt_ids = tokenizer.encode(args.prompt).ids if args.prompt is not None else _parse_ids(args.prompt_ids)
        # Options left out take the model's saved exit settings (see ease.generation.generate).
        options = {}
        if args.full_depth:
            if args.threshold is not None or args.draft_layers is not None:
                raise ValueError("--full-depth excludes --threshold and --draft-layers")
            options["routing_threshold"] = None
        if args.threshold is not None:
            options["routing_threshold"] = args.threshold
        if args.draft_layers is not None:
            options["draft_layers"] = args.draft_layers
        if args.min_exit_layer is not None:
            options["min_exit_layer"] = args.min_exit_layer
        start = time.perf_counter()
        out = model.generate(
            [prompt_ids],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            num_draft_tokens=args.num_draft_tokens,
            seed=args.seed,
            **options,
        )
        seconds = time.perf_counter() - start
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    new_ids = out.new_tokens[0].tolist()
    exit_layers = out.token_exit_layers[0].tolist()
    text = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=False) if tokenizer else None
    report = {
        "text": text,
        "prompt_ids": prompt_ids,
        "new_ids": new_ids,
        "exit_layers": exit_layers,
        "mean_exit_layer": _finite_or_none(out.mean_exit_layer),
        "num_layers": out.num_layers,
        "tokens_per_second": len(new_ids) / seconds if seconds > 0 else None,
    }
    _, _, draft_layers = exit_arguments(
        model, options.get("routing_threshold", UNSET), UNSET, options.get("draft_layers", UNSET)
    )
    speculative = draft_layers is not None
    if speculative:
        report["acceptance_rate"] = _finite_or_none(out.acceptance_rate)
    if args.json:
        print(json.dumps(report, allow_nan=False))
        return 0
    print(text if text is not None else " ".join(map(str, prompt_ids + new_ids)))
    if args.show_exits:
        for token, layer in zip(new_ids, exit_layers):
            piece = tokenizer.decode([token], skip_special_tokens=False) if tokenizer else str(token)
            print(f"  layer {layer:>2}  {piece!r}")
    line = f"mean exit layer: {out.mean_exit_layer:.2f} of {out.num_layers}"
    line += f" ({len(new_ids)} tokens, {report['tokens_per_second']:.1f} tokens/s"
    if speculative:
        line += f", draft acceptance {out.acceptance_rate:.0%}"
    print(line + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
