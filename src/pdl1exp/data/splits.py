"""Patient-level train/test/external assignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

__all__ = ["assign_splits"]


def assign_splits(table: pd.DataFrame, *, test_size: float, seed: int) -> pd.Series:
    """Return each patient's split: the manifest's ``split`` column, or a stratified draw.

    One row is one patient, so the split is patient-level by construction. Without a
    ``split`` column the test set is a label-stratified random ``test_size`` fraction.

    Args:
        table: cohort table indexed by patient_id with ``label`` and ``split`` columns.
        test_size: fraction of patients held out when the manifest gives no split.
        seed: random state of the stratified draw.
    """
    given = table["split"]
    if given.notna().all():
        splits = given.astype(str)
    else:  # the loader rejects a partly filled split column
        _, test = train_test_split(np.arange(len(table)), test_size=test_size,
                                   random_state=seed, stratify=table["label"].to_numpy())
        splits = pd.Series("train", index=table.index)
        splits.iloc[test] = "test"
    train_labels = table.loc[splits == "train", "label"]
    if train_labels.nunique() < 2:
        msg = "the training split must contain both positive and negative patients"
        raise ValueError(msg)
    return splits.rename("split")
