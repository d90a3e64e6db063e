"""Every config group option composes and every ``_target_`` in it instantiates."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hydra._internal.utils import _locate
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from pdl1exp.pipeline import FEATURE_SETS
from tests.conftest import CONF

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _targets(node: object) -> Iterator[DictConfig]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield node
            return
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, ListConfig):
        for value in node:
            yield from _targets(value)


def test_every_group_has_options() -> None:
    assert {"dataset", "segmentation", "backbone", "selection", "classifier", "tuning",
            "evaluation", "tracking"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(compose_cfg, group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "dataset" and option == "manifest":
        overrides.append("dataset.path=cohort.csv")
    if group == "roi" and option == "patch_3d":
        overrides.append("backbone=resnet18_3d")
    if group == "roi" and option == "seed_patch_3d":
        overrides.append("backbone=fmcib_3d")
    cfg = compose_cfg(*overrides)
    for node in _targets(cfg[group]):
        target = _locate(node._target_)
        assert isinstance(target, type), node._target_
        assert isinstance(instantiate(node), target), node._target_


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"+experiment={name}")
    assert cfg.name == name
    assert set(cfg.feature_sets) <= set(FEATURE_SETS)
    assert cfg.evaluation.primary in cfg.feature_sets
    assert len(cfg.classifier) >= 1


def test_all_classifiers_is_the_papers_seven(compose_cfg) -> None:
    cfg = compose_cfg()
    assert list(cfg.classifier) == ["lr", "svm", "knn", "rf", "extra_trees", "xgboost",
                                    "lightgbm"]


def test_paper_experiment_is_the_papers_procedure_with_nested_cv(compose_cfg) -> None:
    cfg = compose_cfg("+experiment=paper")
    assert cfg.tuning.protocol == "nested"  # the procedure's estimate beside the test split
    assert cfg.tuning.choice == "best"  # the paper reports the best of seven classifiers
    assert cfg.clinical.name == "paper"
    assert cfg.selection.name == "paper"
    assert cfg.dataset.test_size == 0.3
    default = compose_cfg("+experiment=fusion")
    assert (default.tuning.protocol, default.tuning.choice) == ("holdout", "one_se")
