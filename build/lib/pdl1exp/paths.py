"""Where the Hydra configs are: ``conf/`` of a checkout, or the copy the wheel carries."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_DIR", "config_dir"]

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """``<repo>/conf`` when running from a source checkout, else ``pdl1exp/conf`` (wheel)."""
    checkout = _PACKAGE.parents[1] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    installed = _PACKAGE / "conf"
    if (installed / "config.yaml").is_file():
        return installed
    msg = f"pdl1exp's configs are missing: neither {checkout} nor {installed} has config.yaml"
    raise FileNotFoundError(msg)


CONFIG_DIR = str(config_dir())
