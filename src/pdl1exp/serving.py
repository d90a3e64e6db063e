"""The selected model as an MLflow pyfunc: signature, extractor identity, registry version."""

from __future__ import annotations

import json
import logging
import tempfile
from importlib.metadata import packages_distributions, version
from pathlib import Path
from typing import Any

import joblib
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "EXTRACTOR_FILE",
    "PREDICTIONS_FILE",
    "SelectedPyfunc",
    "held_out_predictions",
    "log_selected_model",
]

log = logging.getLogger(__name__)

MODEL_PATH = "model"
EXTRACTOR_FILE = "extractor.json"
ESTIMATOR = "estimator"
# Models-from-code: the file MLflow runs to build the pyfunc at load time.
_MODEL_CODE = Path(__file__).with_name("serving_model.py")
# The selected model's held-out predictions (patient_id, split, label, probability), logged
# by the pipeline on the parent run: the test set a promotion compares on.
PREDICTIONS_FILE = "predictions.csv"
CANDIDATE = "candidate"
CHAMPION = "champion"
# Always needed to unpickle and serve, whatever the fitted parts are.
_BASE_MODULES = ("mlflow", "joblib", "numpy", "pandas", "scipy", "sklearn", "pdl1exp")


class SelectedPyfunc(mlflow.pyfunc.PythonModel):
    """Feature table → ``probability`` and ``predicted_status`` (at the stored threshold).

    Logged as MLflow models-from-code (:mod:`pdl1exp.serving_model`): the fitted
    :class:`pdl1exp.models.selected.SelectedModel` travels as the ``estimator`` artifact and
    is loaded in :meth:`load_context`, with the extractor identity beside it.
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.extractor: dict[str, Any] = {}

    def load_context(self, context: PythonModelContext) -> None:
        """Load the fitted model and the identity its image features must be recomputed with."""
        self.model = joblib.load(context.artifacts[ESTIMATOR])
        self.extractor = json.loads(Path(context.artifacts["extractor"]).read_text())

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Probability of the positive class and the status at the train-chosen threshold."""
        proba = self.model.predict_proba(model_input)[:, 1]
        return pd.DataFrame({"probability": proba.astype(np.float64),
                             "predicted_status": (proba >= self.model.threshold).astype(np.int64)})


def _signature(model: Any, example: pd.DataFrame) -> ModelSignature:
    """Named input columns (numbers as double, categories as string) → probability, status."""
    missing = [c for c in model.input_columns if c not in example.columns]
    if missing:
        msg = f"the input example lacks model column(s) {missing[:10]}"
        raise ValueError(msg)
    inputs = [ColSpec("double" if pd.api.types.is_numeric_dtype(example[c]) else "string", c)
              for c in model.input_columns]
    outputs = [ColSpec("double", "probability"), ColSpec("long", "predicted_status")]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def _example_row(model: Any, example: pd.DataFrame) -> pd.DataFrame:
    """One synthetic row (column medians / most frequent values): no patient's own record."""
    row = {}
    for column in model.input_columns:
        values = example[column]
        if pd.api.types.is_numeric_dtype(values):
            row[column] = float(values.median())
        else:
            row[column] = str(values.mode(dropna=True).iloc[0])
    return pd.DataFrame([row])


def _requirements(model: Any) -> list[str]:
    """Pinned distributions of every module the pickled model needs (from its fitted parts)."""
    modules = set(_BASE_MODULES)
    for part in [*(model.image or {}).values(), model.clinical]:
        if part is not None:
            modules.update(type(v).__module__.partition(".")[0]
                           for v in [part, *part.get_params(deep=True).values()]
                           if hasattr(v, "get_params"))
    providers = packages_distributions()
    requirements = set()
    for module in modules:
        names = providers.get(module, [])
        # `mlflow` is provided by mlflow, mlflow-skinny and mlflow-tracing: take the full one.
        name = module if module in names else next(iter(names), None)
        if name is not None:
            requirements.add(f"{name}=={version(name)}")
    return sorted(requirements)


def held_out_predictions(run_id: str) -> pd.DataFrame:
    """The test-split rows of a run's ``predictions.csv`` (index patient_id: label, probability)."""
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREDICTIONS_FILE,
                                                   dst_path=folder)
        table = pd.read_csv(path, dtype={"patient_id": str})
    return table[table["split"] == "test"].set_index("patient_id")[["label", "probability"]]


def log_selected_model(model: Any, *, example: pd.DataFrame, extractor: dict[str, Any],
                       registered_model: str, target: str) -> ModelVersion:
    """Log the selected model on the active run, register it and alias it ``candidate``.

    The version is tagged with the run id, the test AUC and where its test patients are
    (the run's ``predictions.csv``, which must already be logged).

    Args:
        model: a fitted :class:`pdl1exp.models.selected.SelectedModel`.
        example: training rows with at least the model's input columns (types and example).
        extractor: how the deep features were made (configs, weights tag, precision, cache
            key, code version); empty when the model reads no deep features.
        registered_model: registry name.
        target: display name of the predicted outcome (e.g. ``PD-L1``).
    """
    run = mlflow.active_run()
    if run is None:
        msg = "log_selected_model needs an active MLflow run (the experiment's parent run)"
        raise RuntimeError(msg)
    run_id = run.info.run_id
    client = MlflowClient()
    tests = held_out_predictions(run_id)
    mlflow.log_dict(extractor, EXTRACTOR_FILE)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / EXTRACTOR_FILE
        path.write_text(json.dumps(extractor, indent=2, sort_keys=True))
        estimator = Path(folder) / f"{ESTIMATOR}.joblib"
        joblib.dump(model, estimator)
        info = mlflow.pyfunc.log_model(
            name=MODEL_PATH, python_model=str(_MODEL_CODE),
            artifacts={"extractor": str(path), ESTIMATOR: str(estimator)},
            signature=_signature(model, example),
            input_example=_example_row(model, example), pip_requirements=_requirements(model),
            registered_model_name=registered_model)
    number = str(info.registered_model_version)
    test_auc = client.get_run(run_id).data.metrics.get("test_auc", float("nan"))
    tags = {"run_id": run_id, "test_auc": f"{test_auc:.6f}", "n_test": str(len(tests)),
            "test_patients": f"runs:/{run_id}/{PREDICTIONS_FILE}",
            "feature_set": model.feature_set, "threshold": f"{model.threshold:.6f}",
            "target": target}
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, number, key, value)
    client.update_model_version(registered_model, number, description=(
        f"P({target} positive) from the {model.feature_set} model of run {run_id}; positive "
        f"when the probability is >= {model.threshold:.4f} (threshold from training CV)."))
    client.set_registered_model_alias(registered_model, CANDIDATE, number)
    log.info("Registered %s version %s as @%s (test AUC %.3f)", registered_model, number,
             CANDIDATE, test_auc)
    return client.get_model_version(registered_model, number)
