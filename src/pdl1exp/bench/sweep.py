"""Benchmark: wall time of the seven-classifier Optuna sweep on synthetic deep features."""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pdl1exp.models.tuning import fit_folds, prepare_folds, select_best, sweep
from pdl1exp.paths import CONFIG_DIR

__all__ = ["run"]



def _synthetic(
    n_patients: int,
    n_features: int,
    n_informative: int,
    effect_size: float,
    seed: int,
    n_factors: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Synthetic feature table with a planted signal.

    With ``n_factors == 0`` the features are independent Gaussians and the first
    ``n_informative`` shift by ``effect_size`` SD in positives. Otherwise they look like pooled
    CNN features: ReLU of ``n_factors`` shared latent factors plus 10 % noise, hence strongly
    correlated, and the first ``n_informative`` factors carry the shift, so hundreds of
    columns relate to the label: the regime where the LASSO path is hard.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_patients)
    if n_factors:
        factors = rng.standard_normal((n_patients, n_factors))
        factors[:, :n_informative] += effect_size * y[:, None]
        loadings = rng.standard_normal((n_factors, n_features)) / np.sqrt(n_factors)
        noise = rng.standard_normal((n_patients, n_features))
        X = np.maximum(factors @ loadings + 0.1 * noise, 0)
    else:
        X = rng.standard_normal((n_patients, n_features))
        X[:, :n_informative] += effect_size * y[:, None]
    index = pd.Index([f"P{i:04d}" for i in range(n_patients)], name="patient_id")
    columns = [f"dl_{j:04d}" for j in range(n_features)]
    return pd.DataFrame(X, index=index, columns=columns), y


def run(
    n_patients: int = 352,
    n_features: int = 2048,
    n_trials: int | None = None,
    *,
    n_informative: int = 8,
    effect_size: float = 0.5,
    n_factors: int = 0,
    seed: int = 42,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Sweep ``classifier=all`` with ``selection=lasso`` and the default tuning config, as a
    run does (:func:`~pdl1exp.models.tuning.sweep` on an SQLite storage: the studies side by
    side in ``tuning.n_jobs`` processes).

    The selection is fitted once per CV fold and once on all rows (``selection_s``); each
    classifier's ``wall_s`` is its study's trials in its worker process (they overlap), and
    ``sweep_s`` the whole sweep with the refit of every final model.

    Args:
        n_patients: rows of the synthetic table (352: the paper's training cohort).
        n_features: deep-feature columns (2048: the pooled ResNet50 embedding).
        n_trials: trials per classifier; the config's ``tuning.n_trials`` when omitted.
        n_informative: columns (or latent factors) carrying the planted signal.
        effect_size: their mean shift in positives, in standard deviations.
        n_factors: latent factors of CNN-like correlated features; 0: independent columns.
        seed: data and ``${seed}`` of the configs.
        overrides: extra Hydra overrides, e.g. ``("selection=paper",)``.

    Returns:
        Sizes, selection time, total sweep time and, per classifier, wall time, trials/s,
        pruned trials and CV AUC (studies in a throw-away sqlite file, as real runs use one).
    """
    trial_override = () if n_trials is None else (f"tuning.n_trials={n_trials}",)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            overrides=[
                "+classifier=all",
                "+selection=lasso",
                "+tuning=optuna",
                f"+seed={seed}",
                *trial_override,
                *overrides,
            ]
        )
    X, y = _synthetic(n_patients, n_features, n_informative, effect_size, seed, n_factors)
    plain = OmegaConf.to_container(cfg, resolve=True)

    start = time.perf_counter()
    selection = prepare_folds(X, y, selection_cfg=plain["selection"], tuning_cfg=plain["tuning"])
    fit_folds([selection], plain["tuning"]["n_jobs"])  # as the sweep would, in its pool
    selection_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        results = sweep(X, y, classifiers=plain["classifier"], selection_cfg=plain["selection"],
                        tuning_cfg=plain["tuning"], storage=f"sqlite:///{tmp}/optuna.db",
                        study_name="bench", selection=selection)
    per_classifier = {name: {
        "wall_s": round(result.wall_s, 2),
        "trials_per_s": round(result.n_trials / result.wall_s, 3),
        "n_trials": result.n_trials,  # completed
        "n_pruned": result.n_pruned,
        "cv_auc": round(result.cv_auc, 4),
    } for name, result in results.items()}
    return {
        "n_patients": n_patients,
        "n_features": n_features,
        "cv_folds": cfg.tuning.cv_folds,
        "n_trials": cfg.tuning.n_trials,
        "selection": cfg.selection.name,
        "n_selected_per_fold": [fold.X_train.shape[1] for fold in selection.folds],
        "n_selected_all": selection.X_full.shape[1],
        "selection_s": round(selection_s, 2),
        "sweep_s": round(time.perf_counter() - start, 2),
        "best_classifier": select_best(results.values()).name,
        "classifiers": per_classifier,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
