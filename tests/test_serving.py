"""The logged model: signature, extractor identity, registry version, loading elsewhere."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pdl1exp.models.clinical import SIGNATURE, clinical_pipeline, signature
from pdl1exp.models.selected import SelectedModel
from pdl1exp.serving import CANDIDATE, EXTRACTOR_FILE, PREDICTIONS_FILE, log_selected_model
from pdl1exp.tracking import log_frame, setup, tracked_run
from tests.conftest import CONF

DEEP = ["dl_0000", "dl_0001", "dl_0002"]
EXTRACTOR = {"weights_tag": "random:0", "precision": "32-true", "feature_cache_key": "k"}


def tiny_patients(n: int = 30, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Deep features (float32, as extracted), one numeric and one categorical column."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    table = pd.DataFrame(rng.normal(size=(n, len(DEEP))).astype(np.float32) + y[:, None] / 2,
                         columns=DEEP, index=pd.Index([f"P{i:03d}" for i in range(n)],
                                                      name="patient_id"))
    table["age"] = rng.normal(60, 8, n)
    table["sex"] = rng.choice(["F", "M"], n)
    return table, y


def tiny_model(table: pd.DataFrame, y: np.ndarray) -> SelectedModel:
    """A combined model (deep-feature pipeline → signature + clinical logistic model)."""
    dlr = make_pipeline(StandardScaler(), LogisticRegression()).fit(table[DEEP], y)
    clinical = clinical_pipeline(OmegaConf.load(CONF / "clinical" / "paper.yaml"),
                                 numeric=["age", SIGNATURE], categorical=["sex"])
    clinical.fit(table[["age", "sex"]].assign(
        **{SIGNATURE: signature(dlr.predict_proba(table[DEEP])[:, 1], clip=0.01)}), y)
    return SelectedModel(feature_set="combined", image={"dlr": dlr}, clinical=clinical,
                         threshold=0.5, image_features={"dlr": DEEP},
                         clinical_features=["age", "sex"]).fit(None)


def log_version(root: Path, name: str, *, labels: np.ndarray, probability: np.ndarray,
                patients: list[str] | None = None) -> str:
    """Log a run with test predictions and the tiny model; return the new version number."""
    table, y = tiny_patients()
    setup(f"sqlite:///{root}/mlruns/mlflow.db", "serving")
    patients = patients or [f"T{i:03d}" for i in range(len(labels))]
    with tracked_run("tiny"):
        log_frame(pd.DataFrame({"patient_id": patients, "split": "test", "label": labels,
                                "probability": probability}), PREDICTIONS_FILE)
        mlflow.log_metric("test_auc", 0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            version = log_selected_model(tiny_model(table, y), example=table,
                                         extractor=EXTRACTOR, registered_model=name,
                                         target="PD-L1")
    # Models-from-code: MLflow has no pickled Python model to warn about.
    assert not [w for w in caught if "pickle" in str(w.message).lower()]
    return str(version.version)


def test_logged_model_carries_signature_extractor_and_registry_tags(tmp_path: Path) -> None:
    labels = np.array([0, 1, 0, 1])
    number = log_version(tmp_path, "tiny", labels=labels, probability=[0.1, 0.9, 0.4, 0.6])
    client = MlflowClient()
    version = client.get_model_version_by_alias("tiny", CANDIDATE)
    assert str(version.version) == number
    assert version.tags["n_test"] == "4"
    assert version.tags["test_auc"] == "0.500000"
    assert version.tags["test_patients"] == f"runs:/{version.run_id}/{PREDICTIONS_FILE}"
    assert version.tags["run_id"] == version.run_id
    assert version.tags["target"] == "PD-L1"
    assert "P(PD-L1 positive)" in version.description
    run_artifacts = {a.path for a in client.list_artifacts(version.run_id)}
    assert EXTRACTOR_FILE in run_artifacts

    model = mlflow.pyfunc.load_model(f"models:/tiny/{number}")
    assert model.unwrap_python_model().extractor == EXTRACTOR
    inputs = {c.name: c.type.name for c in model.metadata.get_input_schema().inputs}
    assert inputs == {"dl_0000": "double", "dl_0001": "double", "dl_0002": "double",
                      "age": "double", "sex": "string"}
    assert model.metadata.get_output_schema().input_names() == ["probability",
                                                                "predicted_status"]
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/tiny/{number}",
                                                      dst_path=str(tmp_path / "model")))
    requirements = (folder / "requirements.txt").read_text()
    assert "scikit-learn==" in requirements
    assert "pdl1exp==" in requirements
    assert (folder / "serving_model.py").is_file()  # models-from-code
    example = json.loads((folder / "serving_input_example.json").read_text())
    split = example["dataframe_split"]
    assert len(split["data"]) == 1  # one synthetic row, not a patient's record
    row = dict(zip(split["columns"], split["data"][0], strict=True))
    table, _ = tiny_patients()
    assert row["age"] == pytest.approx(table["age"].median())


def test_model_loads_in_a_fresh_process_and_rejects_a_missing_column(tmp_path: Path) -> None:
    log_version(tmp_path, "tiny", labels=np.array([0, 1]), probability=[0.2, 0.7])
    table, y = tiny_patients()
    expected = tiny_model(table, y).predict_proba(table)[:, 1]
    table.to_csv(tmp_path / "input.csv")
    script = (
        "import mlflow, pandas as pd, sys\n"
        "model = mlflow.pyfunc.load_model('models:/tiny@candidate')\n"
        f"table = pd.read_csv({str(tmp_path / 'input.csv')!r}, index_col='patient_id')\n"
        "model.predict(table).to_csv(sys.stdout, index=False)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = pd.read_csv(io.StringIO(done.stdout))
    np.testing.assert_allclose(scores["probability"], expected, atol=1e-6)
    assert scores["predicted_status"].tolist() == (expected >= 0.5).astype(int).tolist()

    model = mlflow.pyfunc.load_model("models:/tiny@candidate")
    with pytest.raises(MlflowException, match=r"missing inputs \['dl_0001', 'sex'\]"):
        model.predict(table.drop(columns=["dl_0001", "sex"]))
