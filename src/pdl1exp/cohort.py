"""``python -m pdl1exp.cohort build-tcia --layout lung1|radiogenomics --root DIR --clinical CSV
--target COLUMN --out manifest.csv``: a manifest from a TCIA download.

The layout is the dataset preset ``conf/dataset/<layout>.yaml``: its ``tcia`` block (the
clinical sheet's patient column, mask modalities by preference) and its clinical columns.
Train on the result with ``python -m pdl1exp +experiment=... dataset=<layout>
dataset.path=manifest.csv``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from pdl1exp.cli import user_errors
from pdl1exp.data.tcia import TciaLayout, build_manifest

__all__ = ["layout", "main"]

CONF = Path(__file__).resolve().parents[2] / "conf"
LAYOUTS = tuple(sorted(p.stem for p in (CONF / "dataset").glob("*.yaml")
                       if "tcia" in OmegaConf.load(p)))


def layout(name: str) -> TciaLayout:
    """The TCIA layout of the dataset preset ``name``."""
    preset = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
    tcia, clinical = preset.tcia, preset.get("clinical", {})
    columns = [*clinical.get("numeric", []), *clinical.get("categorical", [])]
    return TciaLayout(clinical_id=tcia.clinical_id, masks=tuple(tcia.masks),
                      columns=tuple(columns))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pdl1exp.cohort", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tcia = commands.add_parser("build-tcia", help="a manifest from a TCIA download")
    tcia.add_argument("--layout", required=True, choices=LAYOUTS,
                      help="the collection (a conf/dataset preset with a tcia block)")
    tcia.add_argument("--root", required=True, type=Path, help="the downloaded folder")
    tcia.add_argument("--clinical", required=True, type=Path, help="the clinical CSV")
    tcia.add_argument("--target", required=True, help="the clinical column to predict")
    tcia.add_argument("--out", required=True, type=Path, help="the manifest CSV to write")
    return parser


@user_errors("cohort")
def main(argv: Sequence[str] | None = None) -> int:
    """Build the manifest, print what was left out and why; 1 when no patient is usable."""
    args = _parser().parse_args(argv)
    manifest, skipped = build_manifest(root=args.root, clinical=args.clinical,
                                       target=args.target, out=args.out,
                                       layout=layout(args.layout))
    print(f"{len(manifest)} patient(s) written to {args.out}")
    if not skipped.empty:
        print(f"{len(skipped)} patient(s) left out:\n{skipped.to_string(index=False)}")
    return 0 if len(manifest) else 1


if __name__ == "__main__":
    sys.exit(main())
