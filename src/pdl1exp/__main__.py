"""``python -m pdl1exp +experiment=NAME [key=value ...]``: run one experiment."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pdl1exp.cli import run_command, user_errors
from pdl1exp.paths import CONFIG_DIR

__all__ = ["experiment", "main"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
@user_errors("pdl1exp")
def experiment(cfg: DictConfig) -> float:
    """Compose the config, run the experiment and return its objective (CV AUC).

    A data or config error prints its message alone and exits 2; a sweep worker
    (``tuning.role``) prints its one-line summary and exits 0.
    """
    from pdl1exp.pipeline import run  # heavy imports after Hydra has parsed the command line

    return run(cfg)


def main() -> None:
    """The ``pdl1exp`` command."""
    run_command(experiment)


if __name__ == "__main__":
    main()
