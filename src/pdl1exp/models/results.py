"""Result types of the modelling stage: one fitted model with its predictions per split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = ["Fitted", "ModelResult", "held_out_frame", "split_probas"]


@dataclass
class ModelResult:
    """One fitted model and its predictions.

    Args:
        feature_set: ``clinical``, ``dlr``, ``radiomics``, ``dlr+radiomics`` or ``combined``.
        classifier: classifier name.
        cv_auc: CV AUC on the training split (tuning CV for swept models: optimistic).
        threshold: Youden cut-off chosen on the training split's out-of-fold predictions.
        proba: split name → probabilities indexed by patient_id (``train`` apparent,
            ``cv`` out-of-fold, ``test``, ``external_<center>``).
        params: hyperparameters.
        model: the pipeline fitted on the whole training split.
        features: the columns ``model`` reads.
        extra: additional artifacts (tables) for the child run.
        sweep: Optuna sweep summary metrics (mean tuned CV AUC, its fold SD, trial counts).
        calibrator: the recalibration applied to ``model``'s probabilities (None: raw).
    """

    feature_set: str
    classifier: str
    cv_auc: float
    threshold: float
    proba: dict[str, pd.Series]
    params: dict[str, Any]
    model: Any
    features: list[str] = field(default_factory=list)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    sweep: dict[str, float] = field(default_factory=dict)
    calibrator: Any = None

    @property
    def name(self) -> str:
        return f"{self.feature_set}/{self.classifier}"


def split_probas(model: Any, X: pd.DataFrame, splits: pd.Series,
                 centers: pd.Series) -> dict[str, pd.Series]:
    """Probabilities of a fitted model on train (apparent), test and each external center."""
    out = {}
    for split in ("train", "test"):
        rows = splits.index[splits == split]
        if len(rows):
            out[split] = pd.Series(model.predict_proba(X.loc[rows])[:, 1], index=rows)
    external = splits.index[splits == "external"]
    for center in sorted(centers.loc[external].unique()):
        rows = external[centers.loc[external] == center]
        out[f"external_{center or 'all'}"] = pd.Series(model.predict_proba(X.loc[rows])[:, 1],
                                                       index=rows)
    return out


@dataclass
class Fitted:
    """Everything the modelling stage produced.

    Args:
        models: every fitted model (clinical, each image classifier, combined).
        chosen: image feature set → its classifier chosen by tuning CV.
        combined_table: the combined model's input table (clinical columns plus the
            cross-fitted image signatures); None without the combined model.
    """

    models: list[ModelResult]
    chosen: dict[str, ModelResult] = field(default_factory=dict)
    combined_table: pd.DataFrame | None = None

    def swap(self, old: ModelResult, new: ModelResult) -> None:
        """Put ``new`` in ``old``'s place (e.g. its recalibrated version)."""
        self.models = [new if m is old else m for m in self.models]
        self.chosen = {f: new if m is old else m for f, m in self.chosen.items()}

    def primary(self, feature_set: str) -> ModelResult:
        """The pre-specified primary model: the feature set's chosen model."""
        if feature_set in self.chosen:
            return self.chosen[feature_set]
        for model in self.models:
            if model.feature_set == feature_set:
                return model
        msg = (f"evaluation.primary={feature_set!r} is not among the fitted feature sets "
               f"{sorted({m.feature_set for m in self.models})}")
        raise ValueError(msg)


def held_out_frame(result: ModelResult, y: pd.Series) -> pd.DataFrame:
    """A model's out-of-fold and held-out predictions, one row per patient and split."""
    frames = [pd.DataFrame({"patient_id": p.index, "split": name,
                            "label": y.loc[p.index].to_numpy(), "probability": p.to_numpy()})
              for name, p in result.proba.items() if name != "train"]
    return pd.concat(frames, ignore_index=True)
