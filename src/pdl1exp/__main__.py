"""``python -m pdl1exp +experiment=NAME [key=value ...]``: run one experiment."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pdl1exp.pipeline import run

__all__ = ["main"]


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Compose the config, run the experiment and return its objective (CV AUC)."""
    return run(cfg)


if __name__ == "__main__":
    main()
