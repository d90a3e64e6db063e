"""``python -m pdl1exp.predict model_uri=... dataset.path=new.csv output=preds.csv``: scoring.

The manifest goes through the training stages (``cohort_stage`` with optional labels,
``roi_stage``, ``extract_features``) with the configs stored in the model's ``extractor.json``,
so a patient gets the probability training would have given. Refused when this machine's
weights do not have the stored weights tag or the preprocessing code has changed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import hydra
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from omegaconf import DictConfig, OmegaConf

from pdl1exp.cli import run_command, user_errors
from pdl1exp.data.load import cohort_stage
from pdl1exp.data.manifest import Problem, problems_table
from pdl1exp.evaluation import delong_ci
from pdl1exp.features.extract import DEEP_PREFIX, extract_features, extractor_code_version
from pdl1exp.features.radiomics import RADIOMICS_PREFIX, radiomics_stage
from pdl1exp.imaging.rois import roi_stage
from pdl1exp.paths import CONFIG_DIR

__all__ = ["ExtractorMismatchError", "main", "predict"]

log = logging.getLogger(__name__)

_ALIAS_URI = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)")
_VERSION_URI = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")


class ExtractorMismatchError(RuntimeError):
    """This machine would not compute the deep features the model was trained on."""


def _pin(uri: str) -> tuple[str, str]:
    """``(uri to load, version)``: an alias is resolved once, so it cannot move mid-scoring."""
    if match := _ALIAS_URI.fullmatch(uri):
        version = MlflowClient().get_model_version_by_alias(match["name"], match["alias"]).version
        return f"models:/{match['name']}/{version}", str(version)
    match = _VERSION_URI.fullmatch(uri)
    return uri, match["version"] if match else ""


def _stage_config(cfg: DictConfig, extractor: dict[str, Any], *, numeric: list[str],
                  categorical: list[str]) -> DictConfig:
    """The training stages' config: this run's dataset and paths, the model's extractor."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset["clinical"] = {"numeric": numeric, "categorical": categorical}
    backbone = {**extractor.get("backbone", {}),
                **{k: v for k, v in cfg.backbone.items() if v is not None}}
    return OmegaConf.create({**extractor, "backbone": backbone, "dataset": dataset,
                             "paths": OmegaConf.to_container(cfg.paths, resolve=True)})


def _check_reproducible(extractor: dict[str, Any]) -> None:
    """Refuse before any work when this code cannot recompute the model's deep features."""
    code = extractor_code_version()
    if extractor["code_version"] != code:
        msg = (f"the preprocessing/feature code differs from the model's (code version {code}, "
               f"model trained with {extractor['code_version']}): its features would differ. "
               "Score with the pdl1exp commit the model was trained with (run tag git_commit).")
        raise ExtractorMismatchError(msg)
    if extractor["backbone"].get("finetune", {}).get("enabled"):
        msg = (f"the model's backbone was fine-tuned in training ({extractor['weights_tag']}); "
               "scoring with fine-tuned weights is not supported yet")
        raise ExtractorMismatchError(msg)


def _check_extraction(extractor: dict[str, Any], *, weights_tag: str, precision: str) -> None:
    if weights_tag != extractor["weights_tag"]:
        msg = (f"the configured weights load as {weights_tag}, the model was trained on "
               f"{extractor['weights_tag']} (backbone.weights={extractor['backbone']['weights']}"
               "): point backbone.weights at that checkpoint file, or backbone.hub_dir at the "
               "torch hub folder holding it")
        raise ExtractorMismatchError(msg)
    if precision != extractor["precision"]:
        log.warning("Deep features computed in %s, the model's in %s: probabilities may differ "
                    "slightly", precision, extractor["precision"])


def _model_inputs(cfg: DictConfig, stage: DictConfig, extractor: dict[str, Any], *,
                  deep: bool, radiomics: bool) -> tuple[pd.DataFrame, list[Problem]]:
    """Cohort table (+ deep features, + radiomics) of the usable patients, and the problems
    of the rest."""
    cohort = cohort_stage(stage, require_label=False)
    if not (deep or radiomics):
        return cohort.table, list(cohort.problems)
    rois, problems = roi_stage(stage, cohort)
    problems = [*cohort.problems, *problems]
    inputs = cohort.table.loc[rois.index]
    cache = Path(cfg.paths.cache_dir) / "features"
    if radiomics:
        rad = radiomics_stage(stage, rois, source=stage.dataset.path)
        problems += rad.problems
        rois = rois.loc[rois.index.isin(rad.table.index)]
        inputs = inputs.loc[rois.index].join(rad.table)
    if deep:
        extraction = extract_features(rois, preprocess=stage.preprocess, roi=stage.roi,
                                      backbone=stage.backbone, seed=stage.seed,
                                      cache_dir=cache)
        _check_extraction(extractor, weights_tag=extraction.weights_tag,
                          precision=extraction.precision)
        inputs = inputs.join(extraction.table.filter(like=DEEP_PREFIX, axis=1))
    return inputs, problems


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Score the manifest ``cfg.dataset.path``, write ``cfg.output`` and return its rows."""
    mlflow.set_tracking_uri(cfg.tracking.uri)
    uri, version = _pin(cfg.model_uri)
    model = mlflow.pyfunc.load_model(uri)
    wrapper = model.unwrap_python_model()
    selected, extractor = wrapper.model, wrapper.extractor
    image = {c for columns in (selected.image_features or {}).values() for c in columns}
    deep = any(c.startswith(DEEP_PREFIX) for c in image)
    schema = model.metadata.get_input_schema()
    kinds = {c.name: c.type for c in schema.inputs if c.name not in image}
    numeric = [c for c, kind in kinds.items() if kind == DataType.double]
    categorical = [c for c, kind in kinds.items() if kind == DataType.string]
    if deep:
        _check_reproducible(extractor)
    stage = _stage_config(cfg, extractor, numeric=numeric, categorical=categorical)
    inputs, problems = _model_inputs(cfg, stage, extractor, deep=deep,
                                     radiomics=any(c.startswith(RADIOMICS_PREFIX) for c in image))
    scores = model.predict(inputs[schema.input_names()])
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame({"patient_id": inputs.index,
                         "probability": scores["probability"].to_numpy(),
                         "predicted_status": scores["predicted_status"].to_numpy(),
                         "model_uri": cfg.model_uri, "model_version": version})
    rows.to_csv(output, index=False)
    if problems:
        excluded = output.with_name(f"{output.stem}.excluded.csv")
        problems_table(problems).to_csv(excluded, index=False)
        log.warning("%d patient(s) not scored (dataset.on_error=skip), listed in %s",
                    len({p.patient_id for p in problems}), excluded)
    print(f"Scored {len(rows)} patient(s) with {cfg.model_uri} (version {version or '-'}); "
          f"wrote {output}")
    labels = inputs["label"].to_numpy()
    known = labels >= 0
    if len(set(labels[known])) == 2:
        auc, lower, upper = delong_ci(labels[known], rows["probability"].to_numpy()[known],
                                      level=cfg.evaluation.level)
        print(f"AUC {auc:.3f} ({cfg.evaluation.level:.0%} DeLong CI {lower:.3f}-{upper:.3f}) "
              f"on {known.sum()} labelled patient(s)")
    return rows


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@user_errors("predict", ExtractorMismatchError)
def command(cfg: DictConfig) -> None:
    """Score; exit non-zero with the reason when the manifest or the model cannot be used."""
    logging.getLogger("pdl1exp").setLevel(cfg.log_level)
    predict(cfg)


def main() -> None:
    """``python -m pdl1exp.predict``: a user error prints its message alone and exits 2."""
    run_command(command)


if __name__ == "__main__":
    main()
