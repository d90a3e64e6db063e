"""Round trip: train smoke → @candidate → promote → @champion → predict new patients."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.extract import extractor_code_version
from pdl1exp.predict import ExtractorMismatchError, _check_reproducible, predict
from pdl1exp.promote import promote
from pdl1exp.serving import held_out_predictions
from tests.conftest import CONF

MODEL = "pdl1exp-smoke"


def _store(root: Path) -> MlflowClient:
    """A client of the tmp store (also made the process default)."""
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    return MlflowClient()


def _compose(name: str, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def trained(smoke_store) -> Path:
    """The shared smoke run's store: its primary model is @candidate."""
    return smoke_store[0]


@pytest.fixture(scope="module")
def new_patients(trained: Path) -> Path:
    """The smoke test patients as a new manifest: one unlabelled, one with a missing image."""
    run_id = _store(trained).get_model_version_by_alias(MODEL, "candidate").run_id
    tests = held_out_predictions(run_id)
    (source,) = (trained / "cache" / "synthetic").glob("*/manifest.csv")
    table = pd.read_csv(source, dtype={"patient_id": str})
    table = table[table["patient_id"].isin(tests.index)].reset_index(drop=True)
    for column in ("image", "mask"):
        table[column] = [str(source.parent / p) if isinstance(p, str) else p
                         for p in table[column]]
    assert (table["mask"].isna() & table["seed"].notna()).any()  # seed-only rows segment
    table.loc[0, "pdl1_tps"] = np.nan
    bad = table.iloc[[0]].assign(patient_id="NEW_BAD", image=str(trained / "absent.nii.gz"))
    path = trained / "new" / "new.csv"
    path.parent.mkdir()
    pd.concat([table, bad]).to_csv(path, index=False)
    return path


def test_promoted_model_scores_new_patients_as_in_training(trained: Path,
                                                           new_patients: Path) -> None:
    client = _store(trained)
    assert promote(name=MODEL, alpha=0.05).promote
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == client.get_model_version_by_alias(MODEL, "candidate").version

    output = trained / "new" / "preds.csv"
    scored = subprocess.run([
        sys.executable, "-m", "pdl1exp.predict", f"model_uri=models:/{MODEL}@champion",
        f"dataset.path={new_patients}", f"output={output}",
        f"tracking.uri=sqlite:///{trained}/mlruns/mlflow.db", "dataset.on_error=skip",
        f"paths.cache_dir={trained}/predict_cache",
    ], cwd=trained, capture_output=True, text=True, timeout=300, check=False)
    assert scored.returncode == 0, scored.stderr[-3000:]
    rows = pd.read_csv(output, dtype={"patient_id": str}).set_index("patient_id")
    expected = held_out_predictions(champion.run_id)
    assert f"on {len(expected) - 1} labelled patient(s)" in scored.stdout  # AUC without one
    assert set(rows.index) == set(expected.index)  # NEW_BAD excluded, the unlabelled one kept
    np.testing.assert_allclose(rows["probability"], expected["probability"].loc[rows.index],
                               atol=1e-6)
    threshold = float(champion.tags["threshold"])
    assert ((rows["probability"] >= threshold).astype(int) == rows["predicted_status"]).all()
    assert (rows["model_version"].astype(str) == str(champion.version)).all()
    assert (rows["model_uri"] == f"models:/{MODEL}@champion").all()
    assert any((trained / "predict_cache" / "masks").glob("*.nii.gz"))  # segmented anew
    excluded = pd.read_csv(output.with_name("preds.excluded.csv"))
    assert excluded["patient_id"].tolist() == ["NEW_BAD"]


@pytest.mark.parametrize("change", ["weights", "code"])
def test_prediction_refuses_features_it_cannot_reproduce(
        trained: Path, new_patients: Path, change: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [f"model_uri=models:/{MODEL}@candidate", f"dataset.path={new_patients}",
                 f"output={trained}/refused.csv", f"tracking.uri=sqlite:///{trained}/mlruns/"
                 "mlflow.db", "dataset.on_error=skip", f"paths.cache_dir={trained}/cache"]
    if change == "weights":
        checkpoint = trained / "other.pt"
        torch.save(build_backbone(name="resnet18", spatial_dims=2, in_channels=3).state_dict(),
                   checkpoint)
        overrides.append(f"backbone.weights={checkpoint}")
        match = r"load as file:\w{12}, the model was trained on "
    else:
        monkeypatch.setattr("pdl1exp.predict.extractor_code_version", lambda: "changed")
        match = "code differs"
    with pytest.raises(ExtractorMismatchError, match=match):
        predict(_compose("predict", *overrides))
    assert not (trained / "refused.csv").exists()


def test_prediction_refuses_a_fine_tuned_backbone() -> None:
    extractor = {"code_version": extractor_code_version(), "weights_tag": "random:0+finetuned:ab",
                 "backbone": {"finetune": {"enabled": True}}}
    with pytest.raises(ExtractorMismatchError, match="fine-tuned"):
        _check_reproducible(extractor)
