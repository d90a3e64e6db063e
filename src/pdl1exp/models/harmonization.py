"""ComBat harmonisation of features across centers, fitted on training rows only."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from neuroCombat import neuroCombat
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["UNSEEN_RULES", "ComBat", "UnseenCenterWarning"]

UNSEEN_RULES = ("error", "pooled")
_BATCH = "batch"


class UnseenCenterWarning(UserWarning):
    """Rows of a center that the ComBat fit never saw were left unharmonised."""


class ComBat(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """ComBat (Johnson et al. 2007; Fortin et al. 2018) across centers, as a pipeline step.

    :meth:`fit` estimates, on the training rows only, every feature's pooled location and
    scale and each center's additive and multiplicative batch effects with empirical Bayes
    (``neuroCombat.neuroCombat``, the reference Python ComBat). :meth:`transform` removes
    them from any rows: ``x* = (x - mean) / sd``, ``x* <- (x* - gamma_c) / sqrt(delta_c)``,
    ``x = x* sd + mean``; applied to the training rows it reproduces neuroCombat's harmonised
    data. No biological covariate is protected: the label must not enter (it is unknown at
    test time), and clinical variables live in the clinical model.

    The center of a row is looked up by the row's patient id (``X``'s index) in ``batches``,
    so the feature table carries no center column and new, test and external rows are
    harmonised with the training estimates only.

    A center unseen at fit time (an external site): ``unseen="error"`` raises naming its
    patients; ``unseen="pooled"`` treats its rows as the pooled training population, i.e.
    with no batch effect (``gamma = 0``, ``delta = 1``), which leaves them unchanged, with an
    :class:`UnseenCenterWarning`. Estimating the new center's effects from its own rows would
    use the test data to transform itself. Features that are constant within a training
    center cannot be scaled by ComBat and pass through unchanged (``harmonized_`` is False).

    Args:
        batches: patient id -> center (a Series or mapping covering every row to transform).
        parametric: parametric empirical Bayes priors (else non-parametric).
        mean_only: adjust only the location, not the scale.
        eb: shrink the per-center estimates with empirical Bayes.
        unseen: ``"error"`` or ``"pooled"`` (see above).

    Attributes:
        centers_: the training centers.
        n_rows_per_center_: training rows per center.
        mean_, sd_: pooled location and scale of each feature.
        gamma_, delta_: ``(n_centers, n_features)`` additive and multiplicative effects.
        harmonized_: boolean mask of the harmonised features.
    """

    def __init__(self, *, batches: Mapping[str, str] | pd.Series | None = None,
                 parametric: bool = True, mean_only: bool = False, eb: bool = True,
                 unseen: str = "error") -> None:
        self.batches = batches
        self.parametric = parametric
        self.mean_only = mean_only
        self.eb = eb
        self.unseen = unseen

    def _centers(self, X) -> tuple[pd.Index, np.ndarray]:
        """Patient ids and centers of the rows of ``X``; every row must have a center."""
        if self.batches is None:
            msg = "ComBat needs `batches` (patient id -> center); set it with set_params"
            raise ValueError(msg)
        if not isinstance(X, pd.DataFrame):
            msg = "ComBat needs X as a DataFrame indexed by patient id"
            raise TypeError(msg)
        centers = pd.Series(self.batches).reindex(X.index)
        missing = X.index[centers.isna().to_numpy()]
        if len(missing):
            shown = ", ".join(repr(p) for p in missing[:10])
            msg = (f"ComBat: no center for {len(missing)} patient(s) ({shown}); `batches` "
                   f"must map every patient id to its center")
            raise ValueError(msg)
        return X.index, centers.astype(str).to_numpy()

    def fit(self, X, y=None) -> ComBat:
        """Estimate the location/scale model and the center effects on these rows.

        Args:
            X: DataFrame indexed by patient id, no NaN (impute first).
            y: ignored (never a covariate).
        """
        if self.unseen not in UNSEEN_RULES:
            msg = f"unseen={self.unseen!r} is not one of {UNSEEN_RULES}"
            raise ValueError(msg)
        _, centers = self._centers(X)
        values = validate_data(self, X, dtype=np.float64)
        self.centers_, counts = np.unique(centers, return_counts=True)
        self.n_rows_per_center_ = dict(zip(self.centers_.tolist(), counts.tolist(), strict=True))
        if self.centers_.size < 2 or counts.min() < 2:
            msg = (f"ComBat needs at least two centers with two rows each in the training "
                   f"rows; got {self.n_rows_per_center_}")
            raise ValueError(msg)
        within_sd = np.stack([values[centers == c].std(axis=0) for c in self.centers_])
        self.harmonized_ = (within_sd > 0).all(axis=0)
        n_features = values.shape[1]
        self.mean_ = values.mean(axis=0)
        self.sd_ = np.ones(n_features)
        self.gamma_ = np.zeros((self.centers_.size, n_features))
        self.delta_ = np.ones((self.centers_.size, n_features))
        if self.harmonized_.any():
            # neuroCombat prints its progress; its float32 cast applies to DataFrames only.
            with contextlib.redirect_stdout(io.StringIO()):
                fitted = neuroCombat(values[:, self.harmonized_].T,
                                     pd.DataFrame({_BATCH: centers}), _BATCH, eb=self.eb,
                                     parametric=self.parametric, mean_only=self.mean_only)
            estimates = fitted["estimates"]
            cols = self.harmonized_
            self.mean_[cols] = estimates["stand.mean"][:, 0]
            self.sd_[cols] = np.sqrt(estimates["var.pooled"][:, 0])
            self.gamma_[:, cols] = estimates["gamma.star"]
            self.delta_[:, cols] = estimates["delta.star"]
        return self

    def transform(self, X) -> np.ndarray:
        """Remove the training centers' effects from these rows.

        Args:
            X: DataFrame indexed by patient id, with the fitted columns.
        """
        check_is_fitted(self, "gamma_")
        ids, centers = self._centers(X)
        values = validate_data(self, X, dtype=np.float64, reset=False)
        # -1 (unseen) picks the appended pooled row: no batch effect.
        row = pd.Index(self.centers_).get_indexer(centers)
        unseen = row < 0
        if unseen.any():
            msg = (f"ComBat: center(s) {sorted(set(centers[unseen]))} of {int(unseen.sum())} "
                   f"row(s) (e.g. patient {ids[unseen][0]!r}) were not among the training "
                   f"centers {self.centers_.tolist()}")
            if self.unseen == "error":
                msg = f"{msg}; set unseen=pooled to leave them unharmonised"
                raise ValueError(msg)
            warnings.warn(f"{msg}; left unharmonised (pooled)", UnseenCenterWarning,
                          stacklevel=2)
        gamma = np.vstack([self.gamma_, np.zeros(self.gamma_.shape[1])])[row]
        delta = np.vstack([self.delta_, np.ones(self.delta_.shape[1])])[row]
        standard = (values - self.mean_) / self.sd_
        return (standard - gamma) / np.sqrt(delta) * self.sd_ + self.mean_
