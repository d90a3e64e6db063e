"""The classifiers: estimators and search spaces from ``conf/classifier/*.yaml``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from sklearn.base import ClassifierMixin
from sklearn.pipeline import Pipeline

from pdl1exp.models.selection import build_selection

__all__ = ["build_estimator", "build_pipeline", "suggest_params"]

# Search-space ``type`` -> the Optuna method that samples it; the other keys of an entry are
# that method's keyword arguments (low, high, log, step / choices).
_SUGGEST = {
    "float": "suggest_float",
    "int": "suggest_int",
    "categorical": "suggest_categorical",
}


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved plain ``dict`` of a config node (Optuna and sklearn dislike ListConfig)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def suggest_params(trial: optuna.Trial, search_space: Mapping[str, Any]) -> dict[str, Any]:
    """Sample one value per hyperparameter of a classifier's ``search_space``.

    Args:
        trial: the Optuna trial (a :class:`optuna.trial.FixedTrial` replays given values).
        search_space: name -> ``{type: float|int, low, high[, log][, step]}`` or
            ``{type: categorical, choices: [...]}``.

    Returns:
        Keyword arguments for the estimator.
    """
    params = {}
    for name, spec in _plain(search_space).items():
        entry = dict(spec)  # a copy: the caller's search space is reused by every trial
        kind = entry.pop("type", None)
        if kind not in _SUGGEST:
            msg = f"search space entry {name!r} has type {kind!r}; use one of {list(_SUGGEST)}"
            raise ValueError(msg)
        params[name] = getattr(trial, _SUGGEST[kind])(name, **entry)
    return params


def build_estimator(
    spec: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> ClassifierMixin:
    """Instantiate a classifier spec's ``estimator`` and set ``params`` on it.

    Args:
        spec: one value of ``cfg.classifier``: ``{estimator: {_target_: ...}, search_space}``.
        params: hyperparameters, e.g. from :func:`suggest_params`; ``set_params`` names, so
            a wrapped estimator's are reachable (``estimator__C``).
    """
    return instantiate(spec["estimator"], _convert_="all").set_params(**(params or {}))


def build_pipeline(selection_cfg: Mapping[str, Any], estimator: ClassifierMixin,
                   inputs: Mapping[str, Mapping[str, Any]] | None = None) -> Pipeline:
    """The whole model: the selection steps, then ``("classifier", estimator)``.

    Selection steps output DataFrames, so feature names reach the classifier.

    Args:
        selection_cfg: a ``conf/selection/*.yaml`` config (``cfg.selection``).
        estimator: an unfitted classifier with ``predict_proba``.
        inputs: runtime data of the selection steps (:func:`build_selection`).
    """
    steps = [*build_selection(selection_cfg, inputs), ("classifier", estimator)]
    return Pipeline(steps).set_output(transform="pandas")
