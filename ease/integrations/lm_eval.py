"""An lm-evaluation-harness model for ease decoders, registered as ``"ease"``.

From the command line (lm-eval's own flags, with the ``ease`` model known)::

    python -m ease.integrations.lm_eval --model ease \\
        --model_args pretrained=runs/experiments/models/deep_supervision,routing_threshold=0.5 \\
        --tasks my_task --include_path my_tasks/

or ``ease-lm-eval ...``. From Python::

    import ease.integrations.lm_eval          # registers "ease" with lm_eval
    results = ease.integrations.lm_eval.simple_evaluate(
        model_args="pretrained=DIR,routing_threshold=0.5", tasks=["my_task"], task_manager=...)
    results["ease_early_exit"]                 # mean exit layer, fraction of layer computations saved

lm-eval 0.4.x finds models only through its registry (its built-in table and classes
decorated with ``register_model`` in modules already imported); it reads no entry
points for models, and ``--include_path`` adds task folders, not code. So plain
``python -m lm_eval --model ease`` cannot see this model: the command above imports this
module (which registers it) and then runs lm-eval's own command line unchanged. Python
users import this module before ``lm_eval.simple_evaluate(model="ease", ...)``.

``--model_args``: ``pretrained`` (a folder written by ``save_pretrained``, with
``tokenizer.json``, or pass ``tokenizer=PATH``), ``routing_threshold`` (``none`` for
full depth; left out: the model's saved :class:`~ease.models.ExitSettings`),
``min_exit_layer``, ``draft_layers``, ``exit_criterion``, ``device``, ``max_length``,
``max_gen_toks``.

Scoring (``loglikelihood``, ``loglikelihood_rolling``) is teacher-forced: each position's
log-probabilities come from the layer the early-exit rule (:class:`ease.exits.ExitRule`)
picks for it, as :func:`ease.evaluation.evaluate` measures early exit; every layer is
computed, so "compute saved" is the fraction of blocks an exiting inference would skip.
``generate_until`` calls :func:`ease.generation.generate` (real early exit or
self-speculation). The scored and generated tokens' exit layers are reported beside
the task metrics under ``"ease_early_exit"``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lm_eval
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ease.data import END_OF_TEXT
from ease.exits import ExitRule
from ease.generation.api import exit_arguments
from ease.models import TOKENIZER_NAME, UNSET, load_model

__all__ = ["EaseLM", "main", "simple_evaluate"]

_OFF = ("none", "off", "full")


def _unset_or(value: Any) -> Any:
    """A ``--model_args`` value: ``none``/``off`` (a string lm-eval did not turn into None) is None."""
    if isinstance(value, str) and value.strip().lower() in _OFF:
        return None
    return value


def _registered(cls: type) -> type:
    """``register_model("ease")``, except in the copy ``python -m`` runs as ``__main__``:
    that one imports this module (which registers the one class) and delegates to it."""
    return cls if __name__ == "__main__" else register_model("ease")(cls)


@_registered
class EaseLM(LM):
    """lm-eval's view of an ease decoder: scores and generations through its exit rule.

    Args:
        pretrained: the folder ``save_pretrained`` wrote.
        tokenizer: a ``tokenizers`` JSON file; default ``tokenizer.json`` in ``pretrained``.
        routing_threshold, min_exit_layer, draft_layers, exit_criterion: as for
            :func:`ease.generation.generate`; left out, the model's saved exit settings
            (``model.exit_settings``); ``routing_threshold=none`` for full depth.
        device: torch device (default ``"cpu"``; a CUDA device without CUDA falls back to
            the CPU with a warning, as lm-eval's command line asks for ``cuda:0``).
        max_length: the longest input scored (default the model's ``max_seq_len``);
            longer contexts are cut from the left.
        max_gen_toks: ``generate_until``'s default number of new tokens.
        batch_size, max_batch_size: accepted for lm-eval's interface; requests run one
            at a time.

    Raises:
        FileNotFoundError: no model or tokenizer file.
        ValueError: an option out of range (checked as ``generate`` checks it).
    """

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        routing_threshold: Any = UNSET,
        min_exit_layer: Any = UNSET,
        draft_layers: Any = UNSET,
        exit_criterion: Any = UNSET,
        device: str = "cpu",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        batch_size: Any = 1,
        max_batch_size: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from tokenizers import Tokenizer

        device = device or "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line defaults to cuda:0; its own models fall back the same way.
            warnings.warn(f"device={device!r} but CUDA is not available: running on the CPU", stacklevel=2)
            device = "cpu"
        self.model = load_model(pretrained, map_location=device).eval()
        file = Path(tokenizer) if tokenizer else Path(pretrained) / TOKENIZER_NAME
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {file}: save the model with save_pretrained(dir, tokenizer=...) "
                                    "or pass tokenizer=PATH in --model_args")
        self.tokenizer = Tokenizer.from_file(str(file))
        threshold, layer, draft = exit_arguments(
            self.model, _unset_or(routing_threshold), min_exit_layer, _unset_or(draft_layers)
        )
        criterion = self.model.exit_settings.exit_criterion if exit_criterion is UNSET else exit_criterion
        self.rule = ExitRule.for_model(self.model, threshold, layer, criterion)  # checks every value
        self.draft_layers = draft
        self.generate_options: dict[str, Any] = {"routing_threshold": threshold, "min_exit_layer": self.rule.min_exit_layer}
        if draft is not None:
            self.generate_options = {"draft_layers": draft, "min_exit_layer": self.rule.min_exit_layer}
        if criterion != "max_prob":
            self.generate_options["exit_criterion"] = criterion
        self.max_length = int(max_length) if max_length else self.model.config.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.eot_token_id = self.tokenizer.token_to_id(END_OF_TEXT)
        self._scored_layers: list[int] = []
        self._generated_layers: list[int] = []

    # -- tokens -----------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _prefix(self) -> list[int]:
        """The token an empty context stands for (lm-eval's convention: end of text)."""
        if self.eot_token_id is None:
            raise ValueError(f"an empty context needs a start token, and the tokenizer has no {END_OF_TEXT!r}")
        return [self.eot_token_id]

    # -- teacher-forced scores --------------------------------------------------------------
    @torch.no_grad()
    def token_log_probs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-softmax ``(T - 1, V)`` predicting ``ids[1:]`` from the exit layer of each position, and those layers.

        Every layer's logits are computed; position ``t`` answers at the first layer the
        exit rule lets it leave at (the last layer without a threshold).
        """
        model, rule = self.model, self.rule
        inputs = torch.tensor([ids[:-1]], device=model.device)
        layers = list(range(1, model.num_layers + 1))
        states = model.hidden_states(inputs, layers)
        logits = {layer: model.exit_head(states[layer]) for layer in layers}
        if rule.exits_early:
            exits = []
            previous = model.embed(inputs)
            for layer in layers:
                if rule.checks(layer):
                    exits.append(rule.decide(logits[layer], layer, states[layer], previous).exit)
                previous = states[layer]
            exit_layer = rule.first_exit(torch.stack(exits))[0]  # (T - 1,)
        else:
            exit_layer = torch.full((inputs.shape[1],), model.num_layers, dtype=torch.long, device=model.device)
        stacked = torch.stack([logits[layer][0] for layer in layers])  # (L, T - 1, V)
        chosen = stacked.gather(0, (exit_layer - 1)[None, :, None].expand(1, -1, stacked.shape[-1]))[0]
        return F.log_softmax(chosen.float(), dim=-1), exit_layer

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether greedy decoding gives it."""
        if not continuation:
            return 0.0, True
        whole = (context + continuation)[-(self.max_length + 1):]
        log_probs, exit_layer = self.token_log_probs(whole)
        n = len(continuation)
        targets = torch.tensor(whole[-n:], device=log_probs.device)
        picked = log_probs[-n:]
        self._scored_layers += exit_layer[-n:].tolist()
        return float(picked.gather(1, targets[:, None]).sum()), bool((picked.argmax(-1) == targets).all())

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm-eval's own models: trailing spaces of the context go with the continuation,
        # and the continuation's ids are the whole text's beyond the context's.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return self._prefix(), self.tok_encode(continuation)
        whole, head = self.tok_encode(context + continuation), self.tok_encode(context)
        return head, whole[len(head):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for each ``(context, continuation)`` request."""
        return [self._score(*self._encode_pair(*request.args)) for request in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in windows of ``max_length`` after an end-of-text token."""
        results = []
        for request in requests:
            tokens = self.tok_encode(request.args[0])
            total = 0.0
            windows = get_rolling_token_windows(tokens, self._prefix()[0], self.max_length, context_len=1)
            for context, predicted in map(make_disjoint_window, windows):
                total += self._score(context, predicted)[0]
            results.append(total)
        return results

    # -- generation -------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations, cut at the first stop string."""
        outputs = []
        for request in requests:
            context, options = request.args[0], dict(request.args[1] or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(options.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(options.pop("temperature", 0.0)) if options.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context) or self._prefix()
            room = self.model.config.max_seq_len - max(new - 1, 0)
            if room < 1:
                raise ValueError(f"max_gen_toks={new} leaves no room for a context in max_seq_len="
                                 f"{self.model.config.max_seq_len}")
            ids = ids[-room:]
            out = self.model.generate([ids], new, temperature=temperature, seed=0, **self.generate_options)
            new_ids = out.new_tokens[0].tolist()
            if self.eot_token_id is not None and self.eot_token_id in new_ids:
                new_ids = new_ids[: new_ids.index(self.eot_token_id)]
            text = self.tok_decode(new_ids)
            cut = min([text.find(stop) for stop in until if stop and stop in text], default=len(text))
            self._generated_layers += out.token_exit_layers[0, : len(new_ids)].tolist()
            outputs.append(text[:cut])
        return outputs

    # -- what early exit saved --------------------------------------------------------------
    def exit_stats(self) -> dict[str, Any]:
        """Mean exit layer and fraction of layer computations saved over the tokens scored and generated.

        ``compute_saved = 1 - mean_exit_layer / num_layers``; None where no token was.
        """
        num_layers = self.model.num_layers

        def summary(layers: list[int]) -> dict[str, Any]:
            if not layers:
                return {"tokens": 0, "mean_exit_layer": None, "compute_saved": None}
            mean = sum(layers) / len(layers)
            return {"tokens": len(layers), "mean_exit_layer": mean, "compute_saved": 1.0 - mean / num_layers}

        return {
            "num_layers": num_layers,
            "routing_threshold": self.rule.threshold,
            "min_exit_layer": self.rule.min_exit_layer,
            "exit_criterion": self.rule.criterion,
            "draft_layers": self.draft_layers,
            "scored": summary(self._scored_layers),
            "generated": summary(self._generated_layers),
            **{key: value for key, value in summary(self._scored_layers + self._generated_layers).items()},
        }


def simple_evaluate(model: Any = "ease", model_args: str | dict | None = None, **kwargs: Any) -> dict | None:
    """``lm_eval.simple_evaluate`` with the ease model's exit figures under ``results["ease_early_exit"]``.

    ``model`` may be ``"ease"`` (built from ``model_args``, a string or dict), an
    :class:`EaseLM`, or any other lm-eval model (then nothing is added).
    """
    original = _LM_EVAL_SIMPLE_EVALUATE
    if model == "ease":
        extra = {key: kwargs[key] for key in ("batch_size", "max_batch_size", "device") if kwargs.get(key) is not None}
        if isinstance(model_args, dict):
            model = EaseLM.create_from_arg_obj(model_args, extra)
        else:
            model = EaseLM.create_from_arg_string(model_args or "", extra)
        model_args = None
    results = original(model=model, model_args=model_args, **kwargs)
    if isinstance(model, EaseLM) and results is not None:
        results["ease_early_exit"] = model.exit_stats()
    return results


_LM_EVAL_SIMPLE_EVALUATE = lm_eval.simple_evaluate


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``ease`` model registered and its exit figures reported.

    Every flag is lm-eval's; the results (printed with ``--show_config``, saved with
    ``--output_path``) gain ``"ease_early_exit"``, and a line with the mean exit layer
    and the compute saved is printed at the end.
    """
    from lm_eval.__main__ import cli_evaluate

    captured: list[dict] = []

    def evaluate_and_report(*args: Any, **kwargs: Any) -> dict | None:
        results = simple_evaluate(*args, **kwargs)
        if results is not None and "ease_early_exit" in results:
            captured.append(results["ease_early_exit"])
        return results

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # lm-eval's run command imports simple_evaluate from the package at call time.
    lm_eval.simple_evaluate = evaluate_and_report
    try:
        cli_evaluate()
    finally:
        lm_eval.simple_evaluate = _LM_EVAL_SIMPLE_EVALUATE
    for stats in captured:
        mean = stats["mean_exit_layer"]
        if mean is None:
            print("ease early exit: no token scored or generated")
        else:
            print(f"ease early exit: mean exit layer {mean:.2f} of {stats['num_layers']}, "
                  f"compute saved {stats['compute_saved']:.1%} ({stats['tokens']} tokens; "
                  f"routing_threshold={stats['routing_threshold']})")


if __name__ == "__main__":  # python -m ease.integrations.lm_eval
    from ease.integrations.lm_eval import main as _main

    _main()
