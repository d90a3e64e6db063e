"""``python -m pdl1exp +experiment=NAME [key=value ...]``: run one experiment."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pdl1exp.paths import CONFIG_DIR

__all__ = ["main"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Compose the config, run the experiment and return its objective (CV AUC)."""
    from pdl1exp.pipeline import run  # heavy imports after Hydra has parsed the command line

    return run(cfg)


if __name__ == "__main__":
    main()
