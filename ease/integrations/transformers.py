"""``transformers.Trainer`` with the L3T options: :class:`L3TTrainer`.

Trains a Hugging Face decoder of Llama's layout (``model.model.layers``,
``model.model.norm``, ``model.lm_head``: Llama, Mistral, Qwen2) with

- ``layer_weights``: the loss ``sum_l w_l * CE_l`` of every layer's exit (the final norm
  and ``lm_head`` applied to that layer's hidden state), computed by the fused
  :func:`ease_kernels.exit_head_loss` over the layers' hidden states, so the logits of
  every layer never exist at once (memory stays flat in depth);
- ``layer_lr_scales``: one optimiser parameter group per decoder layer (and per
  weight-decay class) at ``learning_rate * scale``;
- ``layer_dropout`` / ``layer_dropout_shape`` (LayerSkip's layer dropout) and
  ``exit_curriculum`` / ``curriculum_period``, with the meanings and the code of
  :mod:`ease.training.layer_dropout` and :mod:`ease.training.curriculum`.

Everything else (arguments, schedules, logging, checkpoints, evaluation, distributed
launch) is the Hugging Face Trainer's own. The options are checked by
:class:`ease.TrainingConfig`, so they get the same verdicts as in ease's own trainer.

Hidden states: ``output_hidden_states=True`` gives ``hidden_states[l]`` after decoder
layer ``l`` (``hidden_states[0]`` is the embedding), except that Hugging Face's last
entry is already passed through ``model.model.norm``. The exit head normalises itself,
so the last layer's state is taken before that norm, from a forward pre-hook on it.

Layers count from 1, as everywhere in ease. Needs ``transformers>=5`` and ``accelerate``
(``pip install 'ease[hf]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
import transformers
from transformers.trainer_optimizer import is_optimizer_factory

import ease_kernels
from ease.config import TrainingConfig
from ease.data import IGNORE_INDEX
from ease.training.curriculum import ExitCurriculum
from ease.training.layer_dropout import LayerDropout

__all__ = ["L3TTrainer", "DecoderParts", "decoder_parts"]


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a Llama-layout Hugging Face decoder the L3T options act on.

    Attributes:
        layers: ``model.model.layers``, the decoder layers (layer ``l`` is ``layers[l - 1]``).
        norm: ``model.model.norm``, the final RMSNorm (the exit head's norm).
        head: ``model.lm_head`` (the exit head's projection).
        prefix: the parameter-name prefix of the layers (``"model.layers."``).
    """

    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Linear
    prefix: str = "model.layers."

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def norm_eps(self) -> float:
        eps = getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", None))
        if eps is None:
            raise ValueError(f"{type(self.norm).__name__} has no 'variance_epsilon' or 'eps'")
        return float(eps)

    # What TrainingConfig.validate_for reads of a model.
    trains_every_layer = True


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The :class:`DecoderParts` of ``model`` (a ``...ForCausalLM`` of Llama's layout).

    Raises:
        ValueError: the model lacks ``model.layers``, ``model.norm`` or ``lm_head``, or its
            final norm is not an RMSNorm with a weight (Gemma's ``1 + weight`` norm is not
            the exit head ease computes).
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(layers, nn.ModuleList) or norm is None or not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} does not have Llama's layout (model.model.layers, model.model.norm, "
            "model.lm_head); L3TTrainer trains Llama, Mistral, Qwen2 and other decoders of that layout"
        )
    if "Gemma" in type(norm).__name__ or getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(norm).__name__}: the final norm must be a Llama-style RMSNorm (weight * x / rms)")
    if getattr(head, "bias", None) is not None:
        raise ValueError("lm_head has a bias; the fused exit-head loss has none")
    return DecoderParts(layers, norm, head)


class L3TTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss, optimiser and layers follow the L3T options.

    Args:
        *args, **kwargs: those of ``transformers.Trainer`` (``model``, ``args``,
            ``train_dataset``, ``data_collator``, ...). Batches hold ``input_ids`` and
            ``labels`` (as for any causal LM: the labels are shifted inside, ``-100`` is
            ignored), and optionally ``attention_mask``.
        layer_weights: ``{layer: weight}`` (1-based); the loss is ``sum_l w_l * CE_l``,
            weights used as given. None: the last layer only (the usual LM loss).
        layer_lr_scales: ``{layer: scale}``; decoder layer ``l``'s parameters train at
            ``args.learning_rate * scale`` (1.0 where missing; embeddings, final norm and
            head at 1.0). Hugging Face's weight-decay split (no decay on norms and
            biases) is kept inside each layer.
        layer_dropout: the largest skip probability of a decoder layer in training
            (``[0, 1)``); a skipped row passes through the layer unchanged.
        layer_dropout_shape: ``"uniform"``, ``"linear"`` or ``"exponential"`` growth of the
            probability with depth.
        exit_curriculum: ``"none"``, ``"rotational"`` or ``"gradual"`` (over
            ``state.max_steps``), by ``state.global_step``.
        curriculum_period: the rotational curriculum's period.
        fused_loss: the chunked :func:`ease_kernels.exit_head_loss` (default); False
            computes every supervised layer's logits plainly (same value).

    Layer dropout draws its decisions from ``(args.seed, state.global_step)``, so the
    micro-batches of one optimiser step under gradient accumulation share them.

    Attributes:
        l3t_config: the :class:`ease.TrainingConfig` the options were checked by.
        layer_weights: every layer's weight, ``{1..num_layers: w}``.

    Raises:
        ValueError: a model not of Llama's layout, or options ``TrainingConfig`` refuses
            (a layer outside ``1..num_layers``, negative or all-zero weights, ...).
    """

    # compute_loss returns the mean over the micro-batch's tokens: the Trainer divides it
    # by the gradient accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        layer_weights: Mapping[int, float] | None = None,
        layer_lr_scales: Mapping[int, float] | None = None,
        layer_dropout: float = 0.0,
        layer_dropout_shape: str = "exponential",
        exit_curriculum: str = "none",
        curriculum_period: int = 2,
        fused_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        parts = decoder_parts(self.model)
        self.l3t_config = TrainingConfig(
            layer_weights=None if layer_weights is None else dict(layer_weights),
            layer_lr_scales=None if layer_lr_scales is None else dict(layer_lr_scales),
            layer_dropout=layer_dropout,
            layer_dropout_shape=layer_dropout_shape,
            exit_curriculum=exit_curriculum,
            curriculum_period=curriculum_period,
            fused_loss=fused_loss,
            seed=self.args.seed,
            verbose=False,
        )
        self.layer_weights = self.l3t_config.weights_for(parts)
        self.l3t_config.check_recipe_for(parts)
        self._dropout = LayerDropout(parts.num_layers, layer_dropout, layer_dropout_shape, self.args.seed)
        self._keep: torch.Tensor | None = None  # this forward's layer-dropout decisions
        self._hooks = [
            # prepend: before transformers' own output recorder, so hidden_states[l] is
            # the state after dropout, the one the next layer sees.
            layer.register_forward_hook(self._make_dropout_hook(index), with_kwargs=True, prepend=True)
            for index, layer in enumerate(parts.layers)
        ]
        self._layer_loss_sums: dict[int, float] = {}
        self._layer_loss_count = 0

    # -- layer dropout ----------------------------------------------------------------------
    def _make_dropout_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            keep = self._keep
            if keep is None or not module.training:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            out = output if isinstance(output, torch.Tensor) else output[0]  # 4.x returned tuples
            chosen = torch.where(keep[:, index, None, None].to(out.device), out, x)
            return chosen if isinstance(output, torch.Tensor) else (chosen, *output[1:])

        return hook

    def remove_layer_hooks(self) -> None:
        """Detach the layer-dropout hooks from the model (inert outside training anyway)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- loss -------------------------------------------------------------------------------
    def step_weights(self, step: int) -> dict[int, float]:
        """Every layer's weight at optimiser step ``step``, after the exit curriculum."""
        config = self.l3t_config
        if config.exit_curriculum == "none":
            return dict(self.layer_weights)
        total = self.state.max_steps if self.state.max_steps and self.state.max_steps > 0 else None
        curriculum = ExitCurriculum(config.exit_curriculum, len(self.layer_weights), config.curriculum_period, total)
        return curriculum.weights(dict(self.layer_weights), step)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``sum_l w_l * CE_l`` of one batch, each ``CE_l`` the token mean of layer ``l``'s exit.

        Position ``t``'s hidden state predicts ``labels[t + 1]``, as in Hugging Face's own
        causal-LM loss; ``-100`` labels are ignored. ``num_items_in_batch`` is not used:
        the loss is this batch's mean (``loss_is_scaled_for_ga = False``).
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("L3TTrainer needs 'labels' in every batch (input_ids, with -100 where ignored)")
        parts = decoder_parts(self.accelerator.unwrap_model(model))
        training = model.training
        weights = self.step_weights(self.state.global_step) if training else dict(self.layer_weights)
        active = [layer for layer, weight in sorted(weights.items()) if weight > 0]
        if training and self._dropout.enabled:
            rows = inputs["input_ids"].shape[0]
            self._keep = self._dropout.keep(self.state.global_step, rows).to(inputs["input_ids"].device)
        captured: list[torch.Tensor] = []
        handle = parts.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            # logits_to_keep=1: the model computes one position's logits, not [B, T, V];
            # the loss computes its own, chunk by chunk.
            outputs = model(**inputs, output_hidden_states=True, use_cache=False,
                            logits_to_keep=0 if return_outputs else 1)
        finally:
            handle.remove()
            self._keep = None
        hidden = list(outputs.hidden_states)
        hidden[parts.num_layers] = captured[-1]  # the last layer's state before the final norm
        targets = labels[:, 1:].to(hidden[0].device)
        states = [hidden[layer][:, :-1] for layer in active]
        layer_weights = [weights[layer] for layer in active]
        if self.l3t_config.fused_loss:
            result = ease_kernels.exit_head_loss(
                states, parts.norm.weight, parts.head.weight, targets, layer_weights, parts.norm_eps,
                ignore_index=IGNORE_INDEX,
            )
        else:
            result = ease_kernels.exit_head_loss_reference(
                states, parts.norm.weight, parts.head.weight, targets, layer_weights, parts.norm_eps,
                ignore_index=IGNORE_INDEX,
            )
        if training:
            for layer, value in zip(active, result.layer_losses.tolist()):
                self._layer_loss_sums[layer] = self._layer_loss_sums.get(layer, 0.0) + value
            self._layer_loss_count += 1
        return (result.loss, outputs) if return_outputs else result.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Hugging Face's log, plus ``loss_layer{l}``: each layer's mean loss since the last log."""
        if "loss" in logs and self._layer_loss_count:
            for layer, total in sorted(self._layer_loss_sums.items()):
                logs[f"loss_layer{layer}"] = total / self._layer_loss_count
            self._layer_loss_sums, self._layer_loss_count = {}, 0
        super().log(logs, start_time)

    # -- optimiser --------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The optimiser ``args.optim`` names, over per-layer parameter groups.

        Groups ``"layer{l}"`` / ``"layer{l}.no_decay"`` hold decoder layer ``l``'s
        parameters at ``learning_rate * layer_lr_scales[l]``; ``"rest"`` /
        ``"rest.no_decay"`` the embeddings, final norm and head at ``learning_rate``.
        Which parameters decay is Hugging Face's ``get_decay_parameter_names``. Learning-rate
        schedules multiply every group's rate, so the ratios hold at every step.

        Raises:
            ValueError: an ``args.optim`` that builds its own parameter groups (GaLore,
                LOMO, Muon...), which per-layer learning rates cannot reach.
        """
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        base_lr = self.args.learning_rate
        decay = set(self.get_decay_parameter_names(opt_model))
        prefix = decoder_parts(opt_model).prefix
        grouped: dict[tuple[int | None, bool], list[nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            layer = None
            if name.startswith(prefix):
                layer = int(name[len(prefix):].split(".", 1)[0]) + 1
            grouped.setdefault((layer, name in decay), []).append(param)
        groups = []
        for (layer, decayed), params in sorted(grouped.items(), key=lambda item: (item[0][0] or 0, not item[0][1])):
            scale = 1.0 if layer is None else self.l3t_config.lr_scale(layer)
            name = ("rest" if layer is None else f"layer{layer}") + ("" if decayed else ".no_decay")
            groups.append({
                "params": params, "lr": base_lr * scale, "weight_decay": self.args.weight_decay if decayed else 0.0,
                "layer": layer, "lr_scale": scale, "name": name,
            })  # fmt: skip
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if "params" in optimizer_kwargs or "model" in optimizer_kwargs or is_optimizer_factory(optimizer_cls):
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups, so layer_lr_scales cannot be "
                "applied; use an optimiser such as adamw_torch"
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
