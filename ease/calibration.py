"""Choosing ``routing_threshold`` on validation data: the cheapest threshold that keeps accuracy.

A token exits at the first layer ``l >= min_exit_layer`` whose exit-head top-1 softmax
probability (:func:`ease_kernels.exit_confidence`) reaches the threshold; the last layer
answers every token left (the rule of :meth:`ease.Trainer.evaluate` and of
:func:`ease.generation.generate`). Raising the threshold can only delay an exit, so the
mean exit layer grows with it, and the lowest threshold whose accuracy stays within
``max_accuracy_drop`` of full depth is the one that saves the most compute.

The sweep is measured teacher-forced: every layer's logits are computed once per batch on
the true context, and every threshold is scored from them. In generation the context is
the model's own output and the skipped layers' keys and values come from state
propagation, so the generated-text agreement is measured separately (``bench/``).

By default the choice is on the measured drop, which the sample's noise can hide: the
lowest of many thresholds whose measured drop is within the limit is often one whose true
drop is not. With ``confidence=1 - delta`` the choice is risk-controlled instead
(Learn-then-Test, Angelopoulos, Bates et al. 2021, as CALM, Schuster et al. 2022, uses it;
:func:`risk_controlled_threshold`): the threshold returned keeps the drop (in agreement with
full depth, or in accuracy) within the limit with probability at least ``1 - delta`` over
the calibration sample.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from ease.data import IGNORE_INDEX, split_batch
from ease.exits import DEFAULT_THRESHOLDS, ExitRule, first_exit_layer
from ease.validation import check_bool, check_real, check_threshold

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ease.models import EarlyExitDecoder

__all__ = [
    "DEFAULT_THRESHOLDS",
    "P_VALUES",
    "RISKS",
    "CalibrationPoint",
    "CalibrationResult",
    "RiskControl",
    "binomial_tail_p_value",
    "calibrate_threshold",
    "fixed_sequence_rejections",
    "hoeffding_bentkus_p_value",
    "risk_controlled_threshold",
]

RISKS = ("accuracy", "agreement")
"""The drops :func:`calibrate_threshold` can bound: in accuracy, or in agreement with full depth."""


# --- Risk control: Learn-then-Test over the threshold grid -------------------------------
#
# Learn-then-Test (Angelopoulos, Bates et al. 2021), as CALM (Schuster et al. 2022) uses it
# for early exit: for each threshold t the null hypothesis H_t: "risk(t) > eps" is tested
# with a p-value that is valid (super-uniform under H_t), and the thresholds are tested in
# a fixed sequence, from the most conservative (highest) down, rejecting while p <= delta
# and stopping at the first failure. Fixed-sequence testing controls the family-wise error
# rate at delta whatever the risk curve looks like (the order is fixed before the data are
# seen), so every rejected threshold, the lowest included, has risk <= eps with probability
# at least 1 - delta over the calibration sample.

P_VALUES = ("binomial", "hoeffding_bentkus")
"""The p-values :func:`risk_controlled_threshold` can test with."""


def _log_binomial_cdf(k: int, n: int, p: float) -> float:
    """``log P(Binomial(n, p) <= k)`` for ``0 <= k < n`` and ``0 < p < 1``, in log space.

    The largest term, ``j = k``, comes from :func:`math.lgamma`; the others from the ratio
    ``pmf(j - 1) / pmf(j) = j (1 - p) / ((n - j + 1) p)``, accumulated as a cumulative sum
    of logarithms (vectorised, and no term underflows before the log-sum-exp).
    """
    log_top = (
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        + k * math.log(p) + (n - k) * math.log1p(-p)
    )  # fmt: skip
    j = np.arange(k, 0, -1, dtype=np.float64)  # the j of each ratio pmf(j - 1) / pmf(j)
    steps = np.log(j) - np.log(n - j + 1) + (math.log1p(-p) - math.log(p))
    log_terms = np.concatenate(([log_top], log_top + np.cumsum(steps)))
    peak = log_terms.max()
    return float(peak + math.log(np.exp(log_terms - peak).sum()))


def binomial_tail_p_value(num_losses: int, num_samples: int, max_risk: float) -> float:
    """The exact p-value of "risk > max_risk" for a 0/1 loss: ``P(Binomial(n, max_risk) <= k)``.

    With ``k`` losses among ``n`` exchangeable samples of a loss in {0, 1}, ``k`` is
    Binomial(n, risk); under the null ``risk > max_risk`` the probability of ``k`` or
    fewer losses is at most the tail at ``risk = max_risk``, so the p-value is valid.
    It is the tightest valid p-value of this form, and never larger than
    :func:`hoeffding_bentkus_p_value` on the same 0/1 losses.

    Args:
        num_losses: ``k``, the number of samples with loss 1 (``0 <= k <= n``).
        num_samples: ``n >= 1``.
        max_risk: the risk level ``eps`` of the null hypothesis, >= 0. ``eps = 0`` is never
            rejected (p = 1); ``eps >= 1`` is an empty null (risk cannot exceed 1), p = 0.

    Returns:
        The p-value in [0, 1].
    """
    k, n = int(num_losses), int(num_samples)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"binomial_tail_p_value needs 0 <= num_losses <= num_samples and num_samples >= 1, got {k}, {n}")
    if max_risk >= 1.0:
        return 0.0
    if max_risk <= 0.0 or k == n:
        return 1.0
    return min(1.0, math.exp(_log_binomial_cdf(k, n, max_risk)))


def hoeffding_bentkus_p_value(risk_estimate: float, num_samples: int, max_risk: float) -> float:
    """The Hoeffding–Bentkus p-value of "risk > max_risk" for a loss bounded in [0, 1].

    ``min(exp(-n h(min(R, eps), eps)), e * P(Binomial(n, eps) <= ceil(n R)))``, with ``R``
    the sample mean of the loss and ``h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b))``
    (Bates et al. 2021, "Distribution-free, risk-controlling prediction sets", and
    Learn-then-Test, Prop. 3). Hoeffding's bound (in its relative-entropy form, Hoeffding
    1963, Thm. 1) and Bentkus' bound (Bentkus 2004) each bound ``P(mean loss <= R)`` from
    above for any loss in [0, 1] with mean ``eps``, and for a larger mean (the null) too;
    so does their minimum, and an upper bound of the null's distribution function taken
    at the observed mean is a valid p-value. (The minimum of two p-values in general is
    not: here both bound the same probability.) For a 0/1 loss
    :func:`binomial_tail_p_value` is exact and never larger.

    Args:
        risk_estimate: ``R``, the mean loss over the samples, in [0, 1].
        num_samples: ``n >= 1``.
        max_risk: ``eps >= 0`` (``eps = 0``: p = 1; ``eps >= 1``: p = 0).

    Returns:
        The p-value in [0, 1].
    """
    n, risk = int(num_samples), float(risk_estimate)
    if n < 1 or not 0.0 <= risk <= 1.0:
        raise ValueError(f"hoeffding_bentkus_p_value needs a risk_estimate in [0, 1] and num_samples >= 1, got {risk}, {n}")
    if max_risk >= 1.0:
        return 0.0
    if max_risk <= 0.0:
        return 1.0
    a = min(risk, max_risk)
    # h(a, eps), with 0 log 0 = 0; a < 1 here since a <= eps < 1.
    entropy = (a * math.log(a / max_risk) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - max_risk))
    hoeffding = math.exp(-n * entropy)
    # ceil(n R), robust to the rounding of a mean computed as a sum divided by n.
    k = min(n, math.ceil(n * risk - 1e-9))
    bentkus = math.e * binomial_tail_p_value(k, n, max_risk)
    return min(1.0, hoeffding, bentkus)


def fixed_sequence_rejections(p_values: Sequence[float], delta: float) -> int:
    """How many hypotheses fixed-sequence testing rejects: the length of the leading run of
    ``p <= delta`` (testing stops at the first failure). ``p_values`` is in testing order."""
    for count, p in enumerate(p_values):
        if not p <= delta:
            return count
    return len(p_values)


class RiskControl(NamedTuple):
    """What :func:`risk_controlled_threshold` found.

    Attributes:
        threshold: the lowest threshold whose null "risk > max_risk" was rejected, or None
            when the first (highest) threshold's was not.
        risk_estimates: ``(S,)`` float64, the mean loss at each threshold (input order).
        p_values: ``(S,)`` float64, each threshold's p-value (input order).
        p_value: the p-value used, one of :data:`P_VALUES`.
        num_samples: the samples each threshold was tested on.
    """

    threshold: float | None
    risk_estimates: np.ndarray
    p_values: np.ndarray
    p_value: str
    num_samples: int


def _test_thresholds(
    thresholds: Sequence[float], loss_sums: Sequence[float], num_samples: int,
    max_risk: float, delta: float, p_value: str,
) -> RiskControl:  # fmt: skip
    """:func:`risk_controlled_threshold` from each threshold's summed loss (arguments checked)."""
    sums = np.asarray(loss_sums, dtype=np.float64)
    risks = sums / num_samples
    if p_value == "binomial":
        p_values = [binomial_tail_p_value(round(total), num_samples, max_risk) for total in sums]
    else:
        p_values = [hoeffding_bentkus_p_value(min(1.0, risk), num_samples, max_risk) for risk in risks]
    p_values = np.asarray(p_values, dtype=np.float64)
    order = sorted(range(len(thresholds)), key=lambda s: -thresholds[s])  # most conservative first
    rejected = fixed_sequence_rejections(p_values[order], delta)
    threshold = float(thresholds[order[rejected - 1]]) if rejected else None
    return RiskControl(threshold, risks, p_values, p_value, num_samples)


def risk_controlled_threshold(
    losses: np.ndarray | torch.Tensor | Sequence[Sequence[float]],
    thresholds: Sequence[float],
    max_risk: float,
    delta: float,
    p_value: str | None = None,
) -> RiskControl:
    """The lowest threshold whose risk is at most ``max_risk`` with probability ``>= 1 - delta``.

    Learn-then-Test: each threshold's null "risk > max_risk" is tested with a valid p-value,
    in a fixed sequence from the highest threshold down, rejecting while ``p <= delta`` and
    stopping at the first failure; the answer is the lowest rejected threshold. The
    guarantee is over the draw of the samples, taken as exchangeable with the tokens the
    threshold will serve; it holds whatever the risk curve's shape (it need not be
    monotone in the threshold).

    Args:
        losses: ``(S, N)``, the loss of each of ``N`` samples at each of ``S`` thresholds,
            every value in [0, 1].
        thresholds: the ``S`` thresholds (any order; they are tested from the highest down).
        max_risk: ``eps``, the largest acceptable risk (mean loss), >= 0.
        delta: the allowed probability of a wrong guarantee, in (0, 1).
        p_value: ``"binomial"`` (exact, 0/1 losses only) or ``"hoeffding_bentkus"`` (any
            loss in [0, 1]); None picks ``"binomial"`` when every loss is 0 or 1.

    Returns:
        :class:`RiskControl`.

    Raises:
        ValueError: ``losses`` not ``(S, N)`` with ``N >= 1`` and ``S == len(thresholds)``,
            a loss outside [0, 1] (or not 0/1 for ``"binomial"``), an unknown ``p_value``,
            ``max_risk < 0`` or ``delta`` outside (0, 1).
    """
    array = np.asarray(losses.detach().cpu() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64)
    thresholds = [float(t) for t in thresholds]
    if array.ndim != 2 or array.shape[0] != len(thresholds) or array.shape[1] == 0:
        raise ValueError(
            f"losses must be (S, N) with S = len(thresholds) = {len(thresholds)} and N >= 1, got shape {array.shape}"
        )
    if not np.all((array >= 0) & (array <= 1)):
        raise ValueError("losses must lie in [0, 1]")
    binary = bool(np.all((array == 0) | (array == 1)))
    if p_value is None:
        p_value = "binomial" if binary else "hoeffding_bentkus"
    if p_value not in P_VALUES:
        raise ValueError(f"p_value must be one of {', '.join(P_VALUES)} or None, got {p_value!r}")
    if p_value == "binomial" and not binary:
        raise ValueError("p_value='binomial' needs 0/1 losses: use 'hoeffding_bentkus' for a loss in [0, 1]")
    max_risk = check_real("max_risk", max_risk, 0.0)
    delta = check_real("delta", delta, 0.0, 1.0, above=True, below=True)
    return _test_thresholds(thresholds, array.sum(1), array.shape[1], max_risk, delta, p_value)


@dataclass
class CalibrationPoint:
    """Early-exit figures at one threshold.

    Attributes:
        threshold: the routing threshold.
        accuracy: top-1 next-token accuracy of the early-exit answers.
        accuracy_drop: full-depth accuracy minus ``accuracy`` (negative: a gain).
        mean_exit_layer: mean layer at which tokens exit (1..num_layers).
        compute_saved: ``1 - mean_exit_layer / num_layers``, the fraction of blocks skipped.
        exit_fractions: ``{layer: fraction of tokens exiting there}`` for every layer.
        agreement: the fraction of tokens whose early-exit prediction equals full depth's.
        risk_estimate: the measured risk the choice compared with ``max_accuracy_drop``:
            ``accuracy_drop`` (``risk="accuracy"``) or ``1 - agreement``
            (``risk="agreement"``); when risk-controlled, the mean of the tested loss on
            the tested tokens (for ``"accuracy"`` the fraction of tokens full depth gets
            right and the exit gets wrong, an upper bound of the drop).
        p_value: the p-value of "risk > max_accuracy_drop" (None unless risk-controlled).
    """

    threshold: float
    accuracy: float
    accuracy_drop: float
    mean_exit_layer: float
    compute_saved: float
    exit_fractions: dict[int, float]
    agreement: float | None = None
    risk_estimate: float | None = None
    p_value: float | None = None


@dataclass
class CalibrationResult:
    """What :func:`calibrate_threshold` found.

    Attributes:
        threshold: the lowest swept threshold whose measured drop is at most
            ``max_accuracy_drop`` (risk-controlled: the lowest the fixed-sequence test
            certified, see :attr:`guarantee`), or None when no threshold qualifies.
        full_depth_accuracy: accuracy of the last layer on every token.
        max_accuracy_drop: the allowed drop (absolute, as a fraction: 0.01 = one point).
        min_exit_layer: no token exited before this layer.
        num_layers: the model's depth.
        num_tokens: target tokens scored.
        layer_accuracy: ``{layer: accuracy}`` when every token answers at that layer.
        sweep: one :class:`CalibrationPoint` per threshold, in increasing threshold order.
        risk: the drop bounded, one of :data:`RISKS`.
        confidence: ``1 - delta`` of the guarantee, or None for the measured choice.
        tested_tokens: the tokens the risk was tested on (``num_tokens``, or one per
            sequence with ``per_sequence``); None unless risk-controlled.
        guarantee: what was certified, in words, e.g. ``"agreement with full depth >= 0.95
            at threshold 0.7, with probability >= 0.9 over 1234 calibration tokens (...)"``;
            None unless risk-controlled.
    """

    threshold: float | None
    full_depth_accuracy: float
    max_accuracy_drop: float
    min_exit_layer: int
    num_layers: int
    num_tokens: int
    layer_accuracy: dict[int, float]
    sweep: list[CalibrationPoint]
    risk: str = "accuracy"
    confidence: float | None = None
    tested_tokens: int | None = None
    guarantee: str | None = None

    @property
    def chosen(self) -> CalibrationPoint | None:
        """The sweep point of :attr:`threshold` (None when no threshold qualifies)."""
        return next((point for point in self.sweep if point.threshold == self.threshold), None)

    def certified_threshold(self, max_accuracy_drop: float) -> float | None:
        """The risk-controlled threshold for another ``max_accuracy_drop``, on the same sample.

        The tested losses do not depend on the allowed drop, so the fixed-sequence test is
        rerun on their sums at the same ``confidence``: what :func:`calibrate_threshold`
        would return with this ``max_accuracy_drop``, without another pass over the data.

        Raises:
            ValueError: the result is not risk-controlled (``confidence=None``), or a bad
                ``max_accuracy_drop``.
        """
        if self.confidence is None or self.tested_tokens is None:
            raise ValueError("certified_threshold needs a risk-controlled result: calibrate with confidence=...")
        max_accuracy_drop = check_real("max_accuracy_drop", max_accuracy_drop, 0.0)
        sums = [round(point.risk_estimate * self.tested_tokens) for point in self.sweep]
        return _test_thresholds([p.threshold for p in self.sweep], sums, self.tested_tokens, max_accuracy_drop,
                                1.0 - self.confidence, "binomial").threshold

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for JSON."""
        return asdict(self)

    def plot(self, path: str | os.PathLike | None = None, title: str | None = None) -> Figure:
        """Accuracy against mean layers used: the threshold sweep, per-layer exits, full depth.

        Args:
            path: where to save the figure (format from the suffix, e.g. ``.png``); None
                only returns it.
            title: the figure title.

        Returns:
            The ``matplotlib.figure.Figure`` (built without pyplot, so no display is needed).

        Raises:
            ImportError: matplotlib is not installed (``pip install 'ease[plots]'``).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:  # an optional dependency
            raise ImportError(
                "CalibrationResult.plot needs matplotlib: pip install matplotlib (or 'ease[plots]')"
            ) from error
        figure = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = figure.add_subplot()
        layers = sorted(self.layer_accuracy)
        ax.plot(layers, [self.layer_accuracy[l] for l in layers], "s:", color="grey",
                label="every token at layer l")
        x = [point.mean_exit_layer for point in self.sweep]
        y = [point.accuracy for point in self.sweep]
        ax.plot(x, y, "o-", color="tab:blue", label="early exit, threshold sweep")
        labelled_at = -math.inf
        for point in self.sweep:  # label thresholds where the labels do not overlap
            if point.mean_exit_layer - labelled_at >= 0.06 * self.num_layers:
                ax.annotate(f"{point.threshold:g}", (point.mean_exit_layer, point.accuracy),
                            textcoords="offset points", xytext=(4, -10), fontsize=7)
                labelled_at = point.mean_exit_layer
        ax.axhline(self.full_depth_accuracy, color="black", lw=0.8, label="full depth")
        if self.risk == "accuracy":  # the limit is on this axis only for an accuracy drop
            ax.axhline(self.full_depth_accuracy - self.max_accuracy_drop, color="black", lw=0.8, ls="--",
                       label=f"full depth - {self.max_accuracy_drop:g}")
        chosen = self.chosen
        if chosen is not None:
            if self.confidence is None:
                label = f"chosen: threshold {chosen.threshold:g}"
            else:
                bound = (f"agreement >= {1 - self.max_accuracy_drop:g}" if self.risk == "agreement"
                         else f"drop <= {self.max_accuracy_drop:g}")
                label = f"guaranteed: threshold {chosen.threshold:g} ({bound}, prob. >= {self.confidence:g})"
            ax.plot([chosen.mean_exit_layer], [chosen.accuracy], "*", ms=14, color="tab:red", label=label)
        ax.set_xlabel("mean layers used per token")
        ax.set_ylabel("next-token accuracy")
        ax.set_xlim(0.5, self.num_layers + 0.5)
        ax.set_title(title or f"Threshold calibration ({self.num_tokens} tokens, min_exit_layer={self.min_exit_layer})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure


def _check_thresholds(thresholds: Iterable[float] | None) -> list[float]:
    values = DEFAULT_THRESHOLDS if thresholds is None else list(thresholds)
    if not values:
        raise ValueError("thresholds must hold at least one threshold")
    return sorted({check_threshold("thresholds", value, allow_none=False) for value in values})


def _one_token_per_row(counted: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices into ``counted``'s True entries (row-major, as boolean indexing orders them):
    one drawn uniformly from each row that has any."""
    per_row = counted.sum(1).cpu()  # (B,)
    starts = torch.cumsum(per_row, 0) - per_row
    offsets = (torch.rand(per_row.shape, generator=generator, dtype=torch.float64) * per_row).long()
    offsets = torch.minimum(offsets, (per_row - 1).clamp(min=0))
    return (starts + offsets)[per_row > 0].to(counted.device)


def _guarantee(risk: str, eps: float, confidence: float, threshold: float | None, tested: int, per_sequence: bool) -> str:
    claim = f"agreement with full depth >= {1 - eps:g}" if risk == "agreement" else f"accuracy drop from full depth <= {eps:g}"
    sample = (f"{tested} calibration tokens, one per sequence" if per_sequence
              else f"{tested} calibration tokens, taken as exchangeable")
    if threshold is None:
        return f"none: no swept threshold certified {claim} with probability >= {confidence:g} over {sample}"
    return f"{claim} at threshold {threshold:g}, with probability >= {confidence:g} over {sample}"


@torch.no_grad()
def calibrate_threshold(
    model: EarlyExitDecoder,
    val_batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    max_accuracy_drop: float = 0.01,
    thresholds: Iterable[float] | None = None,
    min_exit_layer: int = 1,
    exit_criterion: str = "max_prob",
    confidence: float | None = None,
    risk: str = "accuracy",
    per_sequence: bool = False,
) -> CalibrationResult:
    """The lowest routing threshold whose early-exit answers stay near full depth's.

    Each batch runs the model once for the logits of every layer; every threshold is then
    scored from those logits (no rerun per threshold).

    Two rules choose the threshold. With ``confidence=None`` (the default), the lowest one
    whose *measured* drop is at most ``max_accuracy_drop``: no statement about unseen
    tokens, and, since the lowest of many noisy estimates is taken, its true drop often
    exceeds the limit. With ``confidence=1 - delta``, the lowest one whose drop is at most
    ``max_accuracy_drop`` with probability at least ``1 - delta`` over the calibration
    sample, by Learn-then-Test (:func:`risk_controlled_threshold`): the thresholds are
    tested from the highest down, each null "risk > max_accuracy_drop" with the exact
    binomial tail of its 0/1 loss, stopping at the first one not rejected at ``delta``.
    The per-token losses are:

    - ``risk="agreement"``: 1 where the early-exit prediction differs from full depth's;
      the risk is ``1 - agreement``, and the guarantee "agreement >= 1 - max_accuracy_drop";
    - ``risk="accuracy"``: 1 where full depth is right and the exit is wrong. The drop is
      the mean of ``correct_full - correct_exit``, in {-1, 0, 1}; this loss is its
      positive part, so its mean bounds the drop from above (tokens the exit gets right
      and full depth wrong are not credited back), and a bound on it bounds the drop. It
      is 0/1, so the binomial tail applies, which is exact and never larger than the
      Hoeffding–Bentkus p-value (used by :func:`risk_controlled_threshold` for losses
      that are not 0/1). It is at most the agreement loss, so the accuracy guarantee is
      the easier of the two to obtain.

    The guarantee is for tokens drawn like the calibration tokens (teacher-forced), and it
    treats those tokens as exchangeable. The tokens of one sequence are not independent
    (they share a context, and their errors come in runs), so the stated confidence is
    optimistic when the sequences are few; ``per_sequence=True`` tests on one token drawn
    uniformly from each sequence (a fixed seed) instead, which is valid when the
    sequences are exchangeable, at the cost of a much smaller sample. The sweep's other
    figures are computed on every token either way.

    Args:
        model: an :class:`~ease.models.EarlyExitDecoder` (run in eval mode; its mode is
            restored afterwards).
        val_batches: re-iterable batches: ``[B, T + 1]`` token tensors or
            ``(inputs, targets)`` pairs (targets equal to ``IGNORE_INDEX`` are skipped).
        max_accuracy_drop: the largest allowed drop, absolute (0.01 = one percentage
            point): of accuracy, or of agreement with full depth (see ``risk``).
        thresholds: thresholds to sweep, each in (0, 1]; default :data:`DEFAULT_THRESHOLDS`.
        min_exit_layer: no token exits before this layer.
        exit_criterion: the exit score the thresholds apply to
            (:data:`ease.exits.EXIT_CRITERIA`).
        confidence: ``1 - delta`` in (0, 1) for the risk-controlled choice; None for the
            measured one.
        risk: the drop bounded, one of :data:`RISKS`: ``"accuracy"`` (full-depth accuracy
            minus early-exit accuracy) or ``"agreement"`` (the fraction of tokens whose
            early-exit prediction differs from full depth's).
        per_sequence: test on one token per sequence (risk-controlled choice only).

    Returns:
        :class:`CalibrationResult` with the chosen ``threshold`` (or None), the ``sweep``
        and, when risk-controlled, the ``guarantee``.

    Raises:
        ValueError: a bad ``max_accuracy_drop``, threshold, ``min_exit_layer``,
            ``confidence`` or ``risk``; ``per_sequence`` without ``confidence``; no batch or
            no target token.
    """
    max_accuracy_drop = check_real("max_accuracy_drop", max_accuracy_drop, 0.0)
    values = _check_thresholds(thresholds)
    if confidence is not None:
        confidence = check_real("confidence", confidence, 0.0, 1.0, above=True, below=True)
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {', '.join(RISKS)}, got {risk!r}")
    per_sequence = check_bool("per_sequence", per_sequence)
    if per_sequence and confidence is None:
        raise ValueError("per_sequence=True applies to the risk-controlled choice: pass confidence too")
    num_layers = model.num_layers
    # The rule's threshold varies over the sweep; its layers are what is fixed here.
    rule = ExitRule.for_model(model, None, min_exit_layer, exit_criterion)
    min_exit_layer = rule.min_exit_layer

    device = model.device
    threshold_t = torch.tensor(values, device=device)[:, None, None]  # (S, 1, 1)
    layer_correct = torch.zeros(num_layers, dtype=torch.long, device=device)
    exit_correct = torch.zeros(len(values), dtype=torch.long, device=device)
    exit_agree = torch.zeros(len(values), dtype=torch.long, device=device)
    exit_counts = torch.zeros(len(values), num_layers, dtype=torch.long, device=device)
    tested_losses = torch.zeros(len(values), dtype=torch.long, device=device)  # the risk test's loss sums
    generator = torch.Generator().manual_seed(0)  # per_sequence's draw: the same on every call
    tokens = tested = batches = 0
    was_training = model.training
    model.eval()
    try:
        for batch in val_batches:
            batches += 1
            inputs, targets = split_batch(batch)
            inputs, targets = inputs.to(device), targets.to(device, torch.long)
            counted = targets != IGNORE_INDEX
            tokens += int(counted.sum())
            # One model pass per batch: every layer's logits (and, for the criteria that
            # read them, hidden states) score every threshold.
            if rule.needs_hidden:
                hidden = model.hidden_states(inputs, range(1, num_layers + 1))
                previous = model.embed(inputs)
                logits = {layer: model.exit_head(state) for layer, state in hidden.items()}
            else:
                hidden, previous = {}, None
                logits = model(inputs, exit_layers=range(1, num_layers + 1))
            confidences, predictions = [], []
            for layer in range(1, num_layers + 1):
                state = hidden.get(layer)
                decision = rule.score(logits.pop(layer), layer, state, previous)
                confidences.append(decision.confidence[counted])
                predictions.append(decision.prediction[counted])
                previous = state
            scores = torch.stack(confidences)  # (L, N)
            predicted = torch.stack(predictions)  # (L, N)
            correct = predicted == targets[counted]  # (L, N)
            layer_correct += correct.sum(1)
            # exits[s, i, n]: token n may leave at layer min_exit_layer + i under threshold s.
            exits = scores[min_exit_layer - 1 : num_layers - 1] >= threshold_t  # (S, m, N)
            exit_index = first_exit_layer(exits, min_exit_layer, num_layers, dim=1) - 1  # (S, N), 0-based
            token_index = torch.arange(correct.shape[1], device=device)
            exit_right = correct[exit_index, token_index]  # (S, N)
            agrees = predicted[exit_index, token_index] == predicted[-1]  # (S, N)
            exit_correct += exit_right.sum(1)  # (S,)
            exit_agree += agrees.sum(1)
            exit_counts.scatter_add_(1, exit_index, torch.ones_like(exit_index))
            if confidence is not None:
                loss = ~agrees if risk == "agreement" else correct[-1] & ~exit_right  # (S, N), 0/1
                if per_sequence:
                    loss = loss[:, _one_token_per_row(counted, generator)]
                tested_losses += loss.sum(1)
                tested += loss.shape[1]
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError("val_batches yielded no batch (a generator is exhausted after one pass: pass a list)")
    if tokens == 0:
        raise ValueError(f"val_batches hold no target tokens: all targets are ignore_index={IGNORE_INDEX}")

    layer_accuracy = {layer: int(layer_correct[layer - 1]) / tokens for layer in range(1, num_layers + 1)}
    full = layer_accuracy[num_layers]
    control = None
    if confidence is not None:
        control = _test_thresholds(values, tested_losses.cpu().tolist(), tested, max_accuracy_drop,
                                   1.0 - confidence, "binomial")
    layer_numbers = torch.arange(1, num_layers + 1, dtype=torch.float64)
    sweep = []
    for s, threshold in enumerate(values):
        counts = exit_counts[s].cpu()
        mean_exit_layer = float((counts.double() * layer_numbers).sum()) / tokens
        accuracy = int(exit_correct[s]) / tokens
        agreement = int(exit_agree[s]) / tokens
        if control is not None:
            risk_estimate, p_value = float(control.risk_estimates[s]), float(control.p_values[s])
        else:
            risk_estimate, p_value = (1.0 - agreement if risk == "agreement" else full - accuracy), None
        sweep.append(
            CalibrationPoint(
                threshold=threshold,
                accuracy=accuracy,
                accuracy_drop=full - accuracy,
                mean_exit_layer=mean_exit_layer,
                compute_saved=1.0 - mean_exit_layer / num_layers,
                exit_fractions={layer: int(counts[layer - 1]) / tokens for layer in range(1, num_layers + 1)},
                agreement=agreement,
                risk_estimate=risk_estimate,
                p_value=p_value,
            )
        )
    if control is not None:
        threshold = control.threshold
    else:
        # A small tolerance so that a drop equal to the limit, up to float rounding, qualifies.
        qualifying = [p.threshold for p in sweep if p.risk_estimate <= max_accuracy_drop + 1e-12]
        threshold = min(qualifying) if qualifying else None
    return CalibrationResult(
        threshold=threshold,
        full_depth_accuracy=full,
        max_accuracy_drop=float(max_accuracy_drop),
        min_exit_layer=min_exit_layer,
        num_layers=num_layers,
        num_tokens=tokens,
        layer_accuracy=layer_accuracy,
        sweep=sweep,
        risk=risk,
        confidence=confidence,
        tested_tokens=tested if control is not None else None,
        guarantee=None if control is None else _guarantee(
            risk, max_accuracy_drop, confidence, threshold, tested, per_sequence
        ),
    )
