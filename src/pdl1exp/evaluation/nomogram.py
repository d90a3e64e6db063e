"""The nomogram data model: a logistic model drawn as points on one axis per variable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike
from scipy.special import expit, logit

__all__ = ["Nomogram", "NomogramTerm", "axis_ticks"]

# Round tick steps: 1, 2, 2.5 or 5 × 10^k.
_STEPS = (1, 2, 2.5, 5, 10)


def axis_ticks(low: float, high: float, *, n: int) -> np.ndarray:
    """At most ``n`` round tick values within ``[low, high]`` (matplotlib's ``MaxNLocator``).

    Args:
        low: smallest value of the axis.
        high: largest value of the axis.
        n: largest number of ticks (at least 2).
    """
    if high <= low:
        return np.array([float(low)])
    ticks = MaxNLocator(nbins=max(n - 1, 1), steps=list(_STEPS)).tick_values(low, high)
    span = (high - low) * 1e-9
    return ticks[(ticks >= low - span) & (ticks <= high + span)]


@dataclass(frozen=True)
class NomogramTerm:
    """One variable's nomogram axis.

    Args:
        name: the variable.
        values: tick values: raw values (numeric) or levels (categorical).
        points: points scored at each tick value.
        max_points: points at the far end of the variable's observed range (the axis length).
        zero_logit: linear-predictor contribution that scores 0 points (the lowest observed).
    """

    name: str
    values: tuple[float | str, ...]
    points: tuple[float, ...]
    max_points: float
    zero_logit: float


@dataclass(frozen=True)
class Nomogram:
    """A logistic model drawn as points: ``logit(p) = logit_at_zero + total / points_per_logit``.

    Args:
        terms: one axis per variable.
        points_max: points of the variable with the widest contribution range.
        points_per_logit: points per unit of the linear predictor.
        logit_at_zero: linear predictor of a patient scoring 0 points on every axis.
    """

    terms: tuple[NomogramTerm, ...]
    points_max: float
    points_per_logit: float
    logit_at_zero: float

    @property
    def total_max(self) -> float:
        """The largest total a patient within the observed ranges can score."""
        return float(sum(term.max_points for term in self.terms))

    def predict_from_points(self, total_points: ArrayLike) -> np.ndarray:
        """Predicted probability of a total score.

        Args:
            total_points: sums of the points read off every axis.
        """
        total = np.asarray(total_points, dtype=float)
        return expit(self.logit_at_zero + total / self.points_per_logit)

    def points_for_probability(self, probability: ArrayLike) -> np.ndarray:
        """Total score giving a probability (inverse of :meth:`predict_from_points`).

        Args:
            probability: probabilities in (0, 1).
        """
        p = np.asarray(probability, dtype=float)
        return (logit(p) - self.logit_at_zero) * self.points_per_logit
