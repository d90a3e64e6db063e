"""The binary target: which manifest column is the outcome and what counts as positive.

``dataset.target`` is null by default: the label comes from ``label`` (0/1) or ``pdl1_tps``
(PD-L1 TPS ≥ ``dataset.tps_cutoff`` → positive). Any other binary outcome names its column
and either its positive class (optionally its negative class) or a numeric cut-off::

    target: {column: EGFR mutation status, positive: Mutant, negative: Wildtype,
             name: EGFR mutation}
    target: {column: pdl1_tps, cutoff: 1.0}          # value >= cutoff → positive
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_TARGET_NAME", "Target"]

DEFAULT_TARGET_NAME = "PD-L1"
_KEYS = ("column", "positive", "negative", "cutoff", "name")


def _values(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str | int | float) else list(value)
    return tuple(_normal(v) for v in items)


def _normal(value: Any) -> str:
    """Case- and format-insensitive form (" Mutant" == "mutant", "1" == "1.0")."""
    text = str(value).strip().casefold()
    try:
        return repr(float(text))
    except ValueError:
        return text


@dataclass(frozen=True)
class Target:
    """A binary outcome column.

    Args:
        column: the manifest column.
        positive: values meaning positive (compared case-insensitively).
        negative: values meaning negative; empty → every other value is negative.
        cutoff: numeric threshold instead of classes (value ≥ cutoff → positive).
        name: display name for reports ("EGFR mutation"); defaults to the column.
    """

    column: str
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    cutoff: float | None = None
    name: str = ""

    @classmethod
    def from_config(cls, spec: Mapping[str, Any] | None) -> Target | None:
        """Parse ``dataset.target`` (None keeps the label/pdl1_tps default)."""
        if spec is None:
            return None
        unknown = sorted(set(spec) - set(_KEYS))
        column = str(spec.get("column") or "").strip()
        has_classes, has_cutoff = spec.get("positive") is not None, spec.get("cutoff") is not None
        problem = (f"unknown key(s) {unknown}" if unknown else
                   "no column" if not column else
                   "give either positive (a class) or cutoff (a number), not both"
                   if has_classes == has_cutoff else
                   "negative needs positive" if has_cutoff and spec.get("negative") is not None
                   else "a value is both positive and negative"
                   if set(_values(spec.get("positive"))) & set(_values(spec.get("negative")))
                   else None)
        if problem:
            msg = (f"dataset.target: {problem}; e.g. {{column: egfr, positive: mutant}} or "
                   f"{{column: pdl1_tps, cutoff: 1.0}}, got {dict(spec)}")
            raise ValueError(msg)
        return cls(column=column, positive=_values(spec.get("positive")),
                   negative=_values(spec.get("negative")),
                   cutoff=float(spec["cutoff"]) if has_cutoff else None,
                   name=str(spec.get("name") or column))

    def label(self, value: Any) -> int:
        """0/1 for one non-blank value; ValueError saying why it is neither."""
        if self.cutoff is not None:
            try:
                return int(float(value) >= self.cutoff)
            except ValueError as err:
                msg = f"not a number: {value!r} (target cut-off {self.cutoff:g})"
                raise ValueError(msg) from err
        normal = _normal(value)
        if normal in self.positive:
            return 1
        if not self.negative or normal in self.negative:
            return 0
        msg = (f"{value!r} is neither positive {list(self.positive)} nor negative "
               f"{list(self.negative)}")
        raise ValueError(msg)
