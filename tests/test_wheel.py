"""The package works from an installed wheel: configs travel with it, entry points find them."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_and_config_group() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    source = {".".join(p.parent.relative_to(ROOT / "src").parts)
              for p in (ROOT / "src").rglob("__init__.py")}
    groups = {f"pdl1exp.conf.{p.name}" for p in (ROOT / "conf").iterdir() if p.is_dir()}
    assert listed == source | groups | {"pdl1exp.conf"}


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the built wheel installed (--no-deps over this venv's packages)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(root / "dist")],
                   check=True, cwd=root)
    wheel = next((root / "dist").glob("pdl1exp-*.whl"))
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", purelib], check=True, capture_output=True,
                          text=True).stdout.strip()
    # The project's dependencies, not its editable install (a .pth inside a .pth-added
    # folder is not processed, so the editable finder stays off).
    Path(site, "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "-q", str(wheel)], check=True)
    return python


def test_installed_wheel_runs_from_another_folder(wheel_python: Path, tmp_path: Path) -> None:
    where = subprocess.run([wheel_python, "-c", "import pdl1exp.paths as p; print(p.CONFIG_DIR)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert "site-packages" in where
    assert str(ROOT) not in where
    help_text = subprocess.run([wheel_python, "-m", "pdl1exp", "--help"], check=True,
                               capture_output=True, text=True, cwd=tmp_path).stdout
    assert "experiment" in help_text
    job = subprocess.run([wheel_python, "-m", "pdl1exp", "+experiment=smoke", "--cfg", "job"],
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert "name: smoke" in job
    assert "n_patients: 40" in job
    for module in ("pdl1exp.predict", "pdl1exp.promote", "pdl1exp.segment"):
        out = subprocess.run([wheel_python, "-m", module, "--cfg", "job"], check=True,
                             capture_output=True, text=True, cwd=tmp_path).stdout
        assert "tracking" in out or "dataset" in out, module
