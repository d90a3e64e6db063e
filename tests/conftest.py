"""Shared fixtures: the real Hydra config, a tiny synthetic cohort on disk."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from monai.networks.nets import resnet50
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[1] / "conf"

# A cohort small enough for unit tests (64² in-plane, ~12-20 slices).
TINY = {
    "n_patients": 16, "shape_xy": [64, 64], "z_extent_mm": 30.0,
    "spacing_xy_mm": [0.9, 1.1], "slice_spacings_mm": [1.5, 2.5], "n_jobs": 1,
}


def fmcib_trunk() -> torch.nn.Module:
    """FMCIB's trunk as fmcib/models/resnet50.py builds it (MONAI defaults otherwise)."""
    return resnet50(pretrained=False, n_input_channels=1, widen_factor=2, conv1_t_stride=2,
                    feed_forward=False)


def fmcib_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A file in fmcib.torch's format: the trunk under trunk_state_dict, beside the head."""
    head = {"0.0.weight": torch.zeros(2048, 4096), "0.0.bias": torch.zeros(2048)}
    torch.save({"trunk_state_dict": state, "head_state_dict": head}, path)
    return path


@pytest.fixture
def compose_cfg() -> Iterator[Callable[..., DictConfig]]:
    """Compose ``conf/config.yaml`` with overrides, as the command line would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def tiny_overrides(root: Path) -> list[str]:
    """Overrides running the pipeline on a tiny cohort with every output under ``root``."""
    return [
        f"paths.cache_dir={root}/cache",
        f"tracking.uri=sqlite:///{root}/mlruns/mlflow.db",
        f"tuning.storage=sqlite:///{root}/mlruns/optuna.db",
        "dataset.validation.n_jobs=1",
    ]


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of a 16-patient synthetic cohort (written once per session)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    GlobalHydra.instance().clear()
    root = tmp_path_factory.mktemp("cohort")
    generator = instantiate(cfg.dataset.generator, cache_dir=str(root), **TINY)
    return generator.write()


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DictConfig]:
    """One ``+experiment=smoke`` run shared by the tests that read its store (its root and
    config): the end-to-end checks, predict and promote."""
    from pdl1exp.pipeline import run

    root = tmp_path_factory.mktemp("smoke")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=smoke", *tiny_overrides(root)])
    GlobalHydra.instance().clear()
    run(cfg)
    return root, cfg


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy URL) on the server named by
    ``$PDL1EXP_TEST_POSTGRES_URL``, dropped afterwards; skips saying why without one."""
    import uuid

    import sqlalchemy

    url = os.environ.get("PDL1EXP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("PDL1EXP_TEST_POSTGRES_URL is not set (.ci/run sets it up)")
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"pdl1exp_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as err:
        admin.dispose()
        pytest.skip(f"no PostgreSQL server at PDL1EXP_TEST_POSTGRES_URL: {err.orig}")
    yield sqlalchemy.make_url(url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()
