"""A learned exit criterion (CALM's "meta" measure): will this layer answer as the last one does?

:class:`ExitClassifier` maps a layer's hidden state to the probability that the layer's
top-1 prediction equals the final layer's. One small network serves every layer, with
the layer number as an input (a learned embedding): ``dim * hidden + 2 * hidden``
multiply-adds per check, a few percent of a block. :func:`train_exit_classifier` trains
it on a frozen model, teacher-forced: the labels come from the model's own predictions,
so no targets are needed. The classifier becomes part of the model
(``model.exit_classifier``, its width in ``model.config.exit_classifier_dim``), so
``save_pretrained`` / ``from_pretrained`` keep it, and ``exit_criterion="classifier"``
uses it in evaluation, calibration and generation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ease.data import IGNORE_INDEX, Batch, split_batch
from ease.validation import check_int, check_real

__all__ = ["ClassifierTraining", "ExitClassifier", "train_exit_classifier"]


class ExitClassifier(nn.Module):
    """``P(argmax exit_head(h_l) == argmax exit_head(h_L) | h_l, l)``, for layers ``1..L-1``.

    ``score = sigmoid(w_2 . gelu(W_1 norm(h) + e_l) + b)``: an RMS-normalised hidden state,
    one hidden layer of width ``hidden`` shifted by the layer's embedding ``e_l``.

    Args:
        dim: the model's width.
        num_layers: the model's depth (layer numbers ``1..num_layers`` are embedded).
        hidden: the classifier's width.
        norm_eps: the RMSNorm epsilon.
    """

    def __init__(self, dim: int, num_layers: int, hidden: int = 64, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_eps = norm_eps
        self.proj = nn.Linear(dim, hidden)
        self.layer_embedding = nn.Embedding(num_layers, hidden)
        self.out = nn.Linear(hidden, 1)

    def logits(self, hidden: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        """The score before the sigmoid, ``hidden.shape[:-1]``, float32."""
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        index = torch.as_tensor(layer, device=hidden.device) - 1
        h = F.gelu(F.linear(x, self.proj.weight.float(), self.proj.bias.float()) + self.layer_embedding.weight[index].float())
        return F.linear(h, self.out.weight.float(), self.out.bias.float()).squeeze(-1)

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """The exit probability of every token of ``hidden`` ``(..., dim)`` at ``layer`` (1-based)."""
        return torch.sigmoid(self.logits(hidden, layer))

    def cost_per_token(self) -> int:
        """Multiply-adds of one check on one token."""
        return self.proj.in_features * self.proj.out_features + 2 * self.proj.out_features


@dataclass
class ClassifierTraining:
    """What :func:`train_exit_classifier` measured.

    Attributes:
        steps: optimiser steps taken.
        first_loss: the mean binary cross-entropy of the first epoch.
        final_loss: the mean binary cross-entropy of the last epoch.
        positive_rate: ``{layer: fraction of tokens whose prediction equals the last layer's}``.
        accuracy: ``{layer: fraction of tokens the classifier labels right at 0.5}`` (last epoch).
    """

    steps: int
    first_loss: float
    final_loss: float
    positive_rate: dict[int, float]
    accuracy: dict[int, float]


def train_exit_classifier(
    model: nn.Module,
    batches: Iterable[Batch],
    epochs: int = 1,
    lr: float = 3e-3,
    hidden: int = 64,
    verbose: bool = False,
) -> ClassifierTraining:
    """Train ``model.exit_classifier`` on ``batches``; the model itself is not changed.

    Builds the classifier when the model has none (``model.config.exit_classifier_dim =
    hidden``), then for every batch computes, without gradients, every layer's hidden
    state and prediction, labels each token of each layer ``l < L`` with "prediction
    equals the last layer's", and takes one AdamW step on the binary cross-entropy over
    every layer. Targets are used only to leave out ignored positions.

    Args:
        model: an :class:`~ease.models.EarlyExitDecoder` with ``num_layers >= 2``.
        batches: re-iterable batches, as for :meth:`ease.Trainer.train_epoch`.
        epochs: passes over ``batches`` (>= 1).
        lr: AdamW learning rate (> 0).
        hidden: the classifier's width when it is built here (>= 1).
        verbose: a progress bar.

    Returns:
        :class:`ClassifierTraining`.

    Raises:
        ValueError: a model of one layer, bad ``epochs``/``lr``/``hidden``, or no batch.
    """
    epochs = check_int("epochs", epochs, 1)
    lr = check_real("lr", lr, 0.0, above=True)
    hidden = check_int("hidden", hidden, 1)
    num_layers = model.num_layers
    if num_layers < 2:
        raise ValueError(f"an exit classifier needs num_layers >= 2 (layers below the last), got {num_layers}")
    if getattr(model, "exit_classifier", None) is None:
        model.attach_exit_classifier(hidden)
    classifier = model.exit_classifier
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.0)
    layers = torch.arange(1, num_layers, device=model.device)  # the layers that may exit
    was_training = model.training
    model.eval()
    classifier.train()
    steps = 0
    first_loss = None
    try:
        for epoch in range(epochs):
            loss_sum, count = 0.0, 0
            positives = torch.zeros(num_layers - 1, dtype=torch.float64)
            right = torch.zeros(num_layers - 1, dtype=torch.float64)
            for batch in tqdm(batches, desc=f"exit classifier {epoch + 1}/{epochs}", disable=not verbose, leave=False):
                inputs, targets = split_batch(batch)
                inputs, targets = inputs.to(model.device), targets.to(model.device)
                counted = (targets != IGNORE_INDEX).reshape(-1)
                with torch.no_grad():
                    states = model.hidden_states(inputs, range(1, num_layers + 1))
                    predictions = {layer: model.exit_head(h).argmax(-1).reshape(-1) for layer, h in states.items()}
                    stacked = torch.stack([states[layer].reshape(-1, states[layer].shape[-1])[counted] for layer in range(1, num_layers)])
                    labels = torch.stack(
                        [(predictions[layer] == predictions[num_layers])[counted] for layer in range(1, num_layers)]
                    ).float()  # (L - 1, N)
                scores = classifier.logits(stacked, layers[:, None])  # (L - 1, N)
                loss = F.binary_cross_entropy_with_logits(scores, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                tokens = labels.shape[1]
                loss_sum += float(loss.detach()) * tokens
                count += tokens
                positives += labels.sum(1).double().cpu()
                right += ((scores.detach() > 0).float() == labels).sum(1).double().cpu()
            if count == 0:
                raise ValueError("batches yielded no target token to train the exit classifier on")
            if first_loss is None:
                first_loss = loss_sum / count
    finally:
        classifier.eval()
        model.train(was_training)
    return ClassifierTraining(
        steps=steps,
        first_loss=first_loss,
        final_loss=loss_sum / count,
        positive_rate={layer: float(positives[layer - 1]) / count for layer in range(1, num_layers)},
        accuracy={layer: float(right[layer - 1]) / count for layer in range(1, num_layers)},
    )
