"""Publication figures: ROC with CI band, calibration, decision curves, LASSO path, nomogram.

Plotting only (statistics come from :mod:`pdl1exp.evaluation.statistics`); one module so
that every figure shares one style, one size table and one writer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import roc_curve

from pdl1exp.evaluation.nomogram import Nomogram, axis_ticks
from pdl1exp.evaluation.statistics import (
    check_scores,
    delong_ci,
    hosmer_lemeshow,
    metric_value,
    net_benefit,
    net_benefit_treat_all,
    roc_band,
)

__all__ = [
    "Curve",
    "calibration_figure",
    "decision_curve_figure",
    "decision_curves",
    "importance_figure",
    "lasso_path_figure",
    "nomogram_figure",
    "roc_figure",
]

Curve = tuple[np.ndarray, np.ndarray]
"""``(y_true, y_prob)`` of one model on one split."""

# Fonts stay readable when a figure is shrunk to one journal column.
_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
}
_SQUARE_IN = (5.5, 5.5)
_CALIBRATION_IN = (5.5, 6.5)
_WIDE_IN = (7.0, 5.0)
_LASSO_IN = (11.0, 4.8)
_BAR_HEIGHT_IN = 0.28
_NOMOGRAM_ROW_IN = 0.6
_NOMOGRAM_WIDTH_IN = 9.0
_HISTOGRAM_BINS = 20
# Resolution of the specificity grid of the ROC band.
_BAND_GRID = np.linspace(0.0, 1.0, 201)
# Net benefit below this is clipped: a harmful strategy only needs to be seen to be negative.
_NET_BENEFIT_FLOOR = -0.05
_PROBABILITY_TICKS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_POSITIVE, _NEGATIVE, _MUTED = "#c0392b", "#2c7bb6", "#b0b0b0"
# Nomogram tick labels closer than this (axis fraction) alternate above/below the axis.
_LABEL_GAP = 0.04
_POINTS_TICKS = 11


# ---------------------------------------------------------------------------------------------
# helpers


@contextmanager
def _figure(path: Path, *, size: tuple[float, float], dpi: int) -> Iterator[Figure]:
    """A constrained-layout figure in the house style, saved as PNG on exit."""
    with mpl.rc_context(_STYLE):
        fig = Figure(figsize=size, dpi=dpi, layout="constrained")
        yield fig
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")


def _fmt(value: float, digits: int) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def _colors(n: int) -> list[str]:
    cycle = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _check_curves(curves: Mapping[str, Curve]) -> None:
    if not curves:
        msg = "at least one (y_true, y_prob) curve is needed"
        raise ValueError(msg)


def _quantile_bins(p: np.ndarray, groups: int) -> np.ndarray:
    """Bin index of each probability, cut at its quantiles (ties merge bins)."""
    breaks = np.unique(np.quantile(p, np.linspace(0, 1, groups + 1)))
    return np.clip(np.searchsorted(breaks, p, side="left") - 1, 0, None)


def _hosmer_lemeshow_p(y: np.ndarray, p: np.ndarray, groups: int) -> float:
    """Hosmer-Lemeshow p on held-out patients (validation data: df = groups), NaN where the
    test is undefined (a single distinct probability)."""
    if np.unique(p).size < 2:
        return np.nan
    return hosmer_lemeshow(y, p, groups, validation=True)[1]


# ---------------------------------------------------------------------------------------------
# figures


def roc_figure(
    curves: Mapping[str, Curve],
    path: str | Path,
    *,
    title: str,
    band_for: str | None,
    n_boot: int,
    level: float,
    seed: int,
    dpi: int,
) -> Path:
    """ROC curves of several models; legend with AUC and DeLong CI; bootstrap band for one.

    Args:
        curves: model name → ``(y_true, y_prob)``.
        path: PNG to write.
        title: axes title.
        band_for: model whose pointwise sensitivity band is shaded, or None.
        n_boot: bootstrap resamples of the band.
        level: confidence level of the AUC CIs and the band.
        seed: seed of the band's resampling.
        dpi: pixels per inch.
    """
    _check_curves(curves)
    if band_for is not None and band_for not in curves:
        msg = f"band_for={band_for!r} is not one of the curves {list(curves)}"
        raise ValueError(msg)
    path = Path(path)
    with _figure(path, size=_SQUARE_IN, dpi=dpi) as fig:
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color=_MUTED, label="Chance")
        for (name, (y, prob)), color in zip(curves.items(), _colors(len(curves)), strict=True):
            auc, lower, upper = delong_ci(y, prob, level=level)
            fpr, tpr, _ = roc_curve(y, prob, drop_intermediate=False)
            label = f"{name} AUC {auc:.2f} ({lower:.2f}–{upper:.2f})"
            ax.plot(fpr, tpr, lw=1.8, color=color, label=label)
            if name == band_for:
                _, lo, hi = roc_band(y, prob, specificities=_BAND_GRID, n_boot=n_boot,
                                     level=level, seed=seed)
                ax.fill_between(1 - _BAND_GRID, lo, hi, color=color, alpha=0.2, lw=0,
                                label=f"{name} {level:.0%} CI band")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="1 − Specificity", ylabel="Sensitivity",
               title=title)
        ax.set_aspect("equal")
        ax.legend(loc="lower right")
    return path


def calibration_figure(
    curves: Mapping[str, Curve],
    path: str | Path,
    *,
    groups: int,
    title: str,
    dpi: int,
) -> Path:
    """Reliability curves (quantile bins of predicted probability) over a prediction histogram.

    Args:
        curves: model name → ``(y_true, y_prob)``.
        path: PNG to write.
        groups: number of quantile bins (also the Hosmer-Lemeshow groups).
        title: figure title.
        dpi: pixels per inch.
    """
    _check_curves(curves)
    path = Path(path)
    with _figure(path, size=_CALIBRATION_IN, dpi=dpi) as fig:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
        top.plot([0, 1], [0, 1], ls="--", lw=1, color=_MUTED, label="Ideal")
        bins = np.linspace(0, 1, _HISTOGRAM_BINS + 1)
        for (name, (y_true, prob)), color in zip(curves.items(), _colors(len(curves)),
                                                 strict=True):
            y, (p,) = check_scores(y_true, prob, names=(name,), probability=True)
            y = y.astype(float)
            group = _quantile_bins(p, groups)
            size = np.bincount(group)
            keep = size > 0
            mean_p = np.bincount(group, weights=p)[keep] / size[keep]
            observed = np.bincount(group, weights=y)[keep] / size[keep]
            brier = metric_value(y, p, "brier")
            hl_p = _hosmer_lemeshow_p(y, p, groups)
            top.plot(mean_p, observed, marker="o", ms=4, lw=1.5, color=color,
                     label=f"{name} Brier {brier:.3f}, HL p {_fmt(hl_p, 3)} (df {groups})")
            bottom.hist(p, bins=bins, histtype="step", lw=1.5, color=color)
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Observed proportion", title=title)
        top.legend(loc="upper left")
        bottom.set(xlabel="Predicted probability", ylabel="Patients")
    return path


def decision_curves(curves: Mapping[str, Curve], thresholds: ArrayLike) -> pd.DataFrame:
    """Net benefit per threshold: ``threshold``, ``Treat all``, ``Treat none`` and one column
    per model (the data of :func:`decision_curve_figure`).

    All models must be scored on the same patients (one ``y_true``): treat-all depends on it.

    Args:
        curves: model name → ``(y_true, y_prob)``.
        thresholds: threshold probabilities in [0, 1).
    """
    _check_curves(curves)
    labels = [np.asarray(y) for y, _ in curves.values()]
    if any(y.shape != labels[0].shape or (y != labels[0]).any() for y in labels):
        msg = "decision curves need every model scored on the same patients (same y_true)"
        raise ValueError(msg)
    pt = np.asarray(thresholds, dtype=float)
    table = pd.DataFrame({"threshold": pt, "Treat all": net_benefit_treat_all(labels[0], pt),
                          "Treat none": np.zeros(pt.size)})
    for name, (y, prob) in curves.items():
        table[name] = net_benefit(y, prob, pt)
    return table


def decision_curve_figure(
    curves: Mapping[str, Curve],
    path: str | Path,
    *,
    thresholds: ArrayLike,
    title: str,
    dpi: int,
) -> Path:
    """Decision curves: net benefit of every model, treat-all and treat-none.

    Args:
        curves: model name → ``(y_true, y_prob)``, all on the same patients.
        path: PNG to write.
        thresholds: threshold probabilities in [0, 1).
        title: axes title.
        dpi: pixels per inch.
    """
    table = decision_curves(curves, thresholds)
    pt = table["threshold"]
    path = Path(path)
    with _figure(path, size=_WIDE_IN, dpi=dpi) as fig:
        ax = fig.subplots()
        ax.plot(pt, table["Treat all"], lw=1.2, color="0.35", label="Treat all")
        ax.plot(pt, table["Treat none"], lw=1.2, color="0.1", label="Treat none")
        for name, color in zip(curves, _colors(len(curves)), strict=True):
            ax.plot(pt, table[name], lw=1.8, color=color, label=name)
        top = float(table.drop(columns="threshold").to_numpy().max())
        ax.set(xlim=(pt.min(), pt.max()), ylim=(_NET_BENEFIT_FLOOR, top + 0.05 * (top or 1)),
               xlabel="Threshold probability", ylabel="Net benefit", title=title)
        ax.legend(loc="upper right")
    return path


def lasso_path_figure(
    *,
    lambdas: ArrayLike,
    coef_path: ArrayLike,
    chosen_lambda: float,
    cv_curve: pd.DataFrame,
    feature_names: ArrayLike,
    path: str | Path,
    max_labels: int,
    dpi: int,
) -> Path:
    """Two panels: coefficient paths vs log(λ) and the cross-validated score vs log(λ).

    Features kept at ``chosen_lambda`` are drawn in colour, the ``max_labels`` largest of them
    labelled; the rest are grey.

    Args:
        lambdas: the penalty grid (``LassoSelector.lambdas_``).
        coef_path: ``(n_lambdas, n_features)`` coefficients (``coef_path_``).
        chosen_lambda: the selected penalty (``lambda_``).
        cv_curve: ``lambda``, ``score_mean``, ``score_se``, ``n_nonzero`` (``cv_curve_``).
        feature_names: names of the columns of ``coef_path``.
        path: PNG to write.
        max_labels: most selected features named on the path panel.
        dpi: pixels per inch.
    """
    lam = np.asarray(lambdas, dtype=float)
    coefs = np.asarray(coef_path, dtype=float)
    names = np.asarray(feature_names, dtype=str)
    if coefs.shape != (lam.size, names.size):
        msg = (f"coef_path has shape {coefs.shape}, expected (n_lambdas, n_features) = "
               f"({lam.size}, {names.size})")
        raise ValueError(msg)
    log_lam = np.log(lam)
    chosen = int(np.argmin(np.abs(log_lam - np.log(chosen_lambda))))
    at_chosen = coefs[chosen]
    selected = np.flatnonzero(at_chosen != 0)
    labelled = selected[np.argsort(-np.abs(at_chosen[selected]))][:max_labels]
    path = Path(path)
    with _figure(path, size=_LASSO_IN, dpi=dpi) as fig:
        paths_ax, cv_ax = fig.subplots(1, 2)
        # The discarded features' paths (thousands of deep features) as one collection: the
        # same grey lines as one plot() each, drawn in a fraction of the time.
        paths_ax.add_collection(LineCollection(
            [np.column_stack([log_lam, coefs[:, j]]) for j in np.flatnonzero(at_chosen == 0)],
            linewidths=0.6, colors=_MUTED, alpha=0.6))
        paths_ax.autoscale_view()
        # Selected but unlabelled paths stay dark grey so every colour names one feature.
        for j in np.setdiff1d(selected, labelled):
            paths_ax.plot(log_lam, coefs[:, j], lw=1.0, color="0.4")
        for j, color in zip(labelled, _colors(labelled.size), strict=True):
            paths_ax.plot(log_lam, coefs[:, j], lw=1.8, color=color, label=names[j])
        for ax in (paths_ax, cv_ax):
            ax.axvline(log_lam[chosen], ls="--", lw=1, color="0.2")
        paths_ax.axhline(0, lw=0.8, color="0.5")
        paths_ax.set(xlabel="log(λ)", ylabel="Coefficient",
                     title=f"Coefficient paths ({selected.size} selected)")
        if labelled.size:
            paths_ax.legend(loc="best")
        cv_lam = np.log(cv_curve["lambda"].to_numpy(dtype=float))
        cv_ax.errorbar(cv_lam, cv_curve["score_mean"], yerr=cv_curve["score_se"], fmt="o",
                       ms=3.5, lw=1, capsize=2, color=_POSITIVE)
        cv_ax.set(xlabel="log(λ)", ylabel="Cross-validated score (mean ± SE)",
                  title=f"Cross-validation, chosen λ = {lam[chosen]:.3g}")
    return path


def importance_figure(
    importance: pd.Series, path: str | Path, *, title: str, top: int, dpi: int
) -> Path:
    """Horizontal bars of the ``top`` features by absolute value, largest at the top.

    Args:
        importance: feature name → coefficient or permutation importance.
        path: PNG to write.
        title: axes title (say what the values are).
        top: number of features shown.
        dpi: pixels per inch.
    """
    if importance.empty:
        msg = "importance_figure needs at least one feature"
        raise ValueError(msg)
    shown = importance.loc[importance.abs().sort_values(ascending=False).index[:top]][::-1]
    colors = np.where(shown.to_numpy() >= 0, _POSITIVE, _NEGATIVE)
    path = Path(path)
    height = max(_WIDE_IN[1] / 2, _BAR_HEIGHT_IN * shown.size + 1.0)
    with _figure(path, size=(_WIDE_IN[0], height), dpi=dpi) as fig:
        ax = fig.subplots()
        ax.barh(shown.index.astype(str), shown.to_numpy(), color=colors)
        ax.axvline(0, lw=0.8, color="0.3")
        ax.set(title=title, xlabel=str(importance.name or "Importance"))
    return path


def _axis(ax: Axes, y: float, *, label: str, positions: np.ndarray, ticks: list[str],
          span: tuple[float, float]) -> None:
    """One nomogram row: a line over ``span`` (axis fractions) with labelled ticks."""
    ax.plot(span, [y, y], lw=1.2, color="0.1")
    ax.text(-0.02, y, label, ha="right", va="center", fontweight="bold")
    order = np.argsort(positions)
    last, below = -np.inf, False
    for i in order:
        # Crowded labels (close categorical levels) alternate sides instead of overlapping.
        below = not below if positions[i] - last < _LABEL_GAP else False
        last = positions[i]
        ax.plot([positions[i]] * 2, [y, y + (-0.12 if below else 0.12)], lw=1, color="0.1")
        ax.text(positions[i], y + (-0.16 if below else 0.16), ticks[i], ha="center",
                va="top" if below else "bottom", fontsize=8)


def nomogram_figure(nomogram: Nomogram, path: str | Path, *, dpi: int) -> Path:
    """The classic nomogram: points, one axis per variable, total points, probability.

    Variable axes share the points scale (0 to ``points_max``); the total-points and
    probability axes share the total scale (0 to the highest attainable total).

    Args:
        nomogram: output of :func:`pdl1exp.models.nomogram.build_nomogram`.
        path: PNG to write.
        dpi: pixels per inch.
    """
    total_max = nomogram.total_max
    n_rows = len(nomogram.terms) + 3
    path = Path(path)
    with _figure(path, size=(_NOMOGRAM_WIDTH_IN, _NOMOGRAM_ROW_IN * n_rows + 0.6),
                 dpi=dpi) as fig:
        ax = fig.subplots()
        ax.set_axis_off()
        points = axis_ticks(0, nomogram.points_max, n=_POINTS_TICKS)
        _axis(ax, 0, label="Points", positions=points / nomogram.points_max,
              ticks=[f"{v:g}" for v in points], span=(0, 1))
        for row, term in enumerate(nomogram.terms, start=1):
            ticks = [v if isinstance(v, str) else f"{v:g}" for v in term.values]
            _axis(ax, -row, label=term.name, span=(0, term.max_points / nomogram.points_max),
                  positions=np.asarray(term.points) / nomogram.points_max, ticks=ticks)
        row = len(nomogram.terms) + 1
        totals = axis_ticks(0, total_max, n=_POINTS_TICKS)
        _axis(ax, -row, label="Total points", positions=totals / total_max,
              ticks=[f"{v:g}" for v in totals], span=(0, 1))
        at = nomogram.points_for_probability(_PROBABILITY_TICKS)
        inside = (at >= 0) & (at <= total_max)
        low, high = nomogram.predict_from_points([0, total_max])
        _axis(ax, -row - 1, label="Probability", positions=at[inside] / total_max,
              ticks=[f"{p:g}" for p in np.asarray(_PROBABILITY_TICKS)[inside]],
              span=(0, 1))
        ax.text(1.0, -row - 1.45, f"range {low:.3f}–{high:.3f}", ha="right", fontsize=8,
                color="0.4")
        ax.set(xlim=(-0.02, 1.03), ylim=(-row - 1.6, 0.6))
    return path
