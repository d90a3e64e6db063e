"""The registered model as one estimator: patient feature table → probability of the positive
class of the configured target (PD-L1 positive by default)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from pdl1exp.models.clinical import signature, signature_column

__all__ = ["SelectedModel"]


class SelectedModel(ClassifierMixin, BaseEstimator):
    """Chain the fitted parts of the registered model and carry its decision threshold.

    ``image`` maps each image feature set it uses (``dlr``, ``radiomics``, ``dlr+radiomics``)
    to a fitted pipeline from that set's columns to a probability; ``clinical`` maps the
    clinical columns (plus each image signature for ``combined``) to a probability. All parts
    are fitted on the training split; this class fits nothing itself.

    Args:
        feature_set: ``clinical``, an image feature set, or ``combined``.
        image: image feature set → fitted pipeline (one for an image feature set, the
            signatures' models for ``combined``, none for ``clinical``).
        image_features: image feature set → the columns its pipeline reads.
        clinical: fitted clinical/combined pipeline (``clinical`` and ``combined``).
        threshold: train-chosen cut-off; positive when probability >= threshold.
        clinical_features: clinical columns the clinical pipeline reads.
        signature_clip: the clip of the image signatures (:func:`signature`).
        calibrator: fitted recalibration of the probability (``transform``), or None.
    """

    def __init__(self, *, feature_set: str, image: Mapping[str, Any] | None = None,
                 image_features: Mapping[str, Sequence[str]] | None = None,
                 clinical: Any = None, threshold: float = 0.5,
                 clinical_features: Sequence[str] = (), signature_clip: float = 0.01,
                 calibrator: Any = None) -> None:
        self.feature_set = feature_set
        self.image = image
        self.image_features = image_features
        self.clinical = clinical
        self.threshold = threshold
        self.clinical_features = clinical_features
        self.signature_clip = signature_clip
        self.calibrator = calibrator

    @property
    def input_columns(self) -> list[str]:
        """Every column the model reads, in order."""
        image = [c for columns in (self.image_features or {}).values() for c in columns]
        clinical = list(self.clinical_features) if self.clinical is not None else []
        return list(dict.fromkeys([*image, *clinical]))

    def fit(self, X: pd.DataFrame, y=None) -> SelectedModel:
        """Check the parts (they arrive fitted) and record the classes."""
        image = dict(self.image or {})
        if set(image) != set(self.image_features or {}):
            msg = "image and image_features must name the same feature sets"
            raise ValueError(msg)
        has_clinical = self.clinical is not None
        if self.feature_set == "clinical":
            valid = not image and has_clinical
        elif self.feature_set == "combined":
            valid = bool(image) and has_clinical
        else:
            valid = set(image) == {self.feature_set} and not has_clinical
        if not valid:
            msg = (f"feature_set {self.feature_set!r} does not match its parts: image models "
                   f"{sorted(image)}, {'a' if has_clinical else 'no'} clinical model")
            raise ValueError(msg)
        self.classes_ = np.array([0, 1])
        return self

    def _check_columns(self, X: pd.DataFrame) -> None:
        missing = [c for c in self.input_columns if c not in X.columns]
        if missing:
            msg = (f"input is missing {len(missing)} column(s) the model needs: {missing[:10]}"
                   f"{' ...' if len(missing) > 10 else ''}")
            raise ValueError(msg)

    def _image_proba(self, name: str, X: pd.DataFrame) -> np.ndarray:
        return self.image[name].predict_proba(X[list(self.image_features[name])])[:, 1]

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        self._check_columns(X)
        if self.clinical is None:
            positive = self._image_proba(next(iter(self.image)), X)
        else:
            table = X[list(self.clinical_features)].copy()
            for name in self.image or {}:
                table[signature_column(name)] = signature(self._image_proba(name, X),
                                                               clip=self.signature_clip)
            positive = self.clinical.predict_proba(table)[:, 1]
        if self.calibrator is not None:
            positive = self.calibrator.transform(positive)
        return np.column_stack([1 - positive, positive])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Predicted status at the train-chosen threshold."""
        return (self.predict_proba(X)[:, 1] >= self.threshold).astype(int)
