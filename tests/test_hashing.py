"""Content hashes: equal for equal content, whatever the memory layout; else different."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pdl1exp.hashing import frame_digest


def features(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.standard_normal((6, 4)), columns=[f"f{j}" for j in range(4)],
                        index=pd.Index([f"P{i}" for i in range(6)], name="patient_id"))


def test_a_table_hashes_by_content_not_layout() -> None:
    X = features()
    fortran = pd.DataFrame(np.asfortranarray(X.to_numpy()), index=X.index, columns=X.columns)
    from_columns = pd.DataFrame({c: X[c].to_numpy() for c in X.columns}, index=X.index)
    assert frame_digest(X) == frame_digest(fortran) == frame_digest(from_columns)


@pytest.mark.parametrize("change", [
    lambda X: X.assign(f0=X["f0"] + 1e-12),                      # a value
    lambda X: X.rename(index={"P0": "P9"}),                      # a patient
    lambda X: X.rename(columns={"f0": "g0"}),                    # a column name
    lambda X: X.iloc[::-1],                                      # row order
    lambda X: X.astype("float32"),                               # a dtype
    lambda X: X.assign(f0=X["f0"].astype(str)),                  # mixed (object) columns
])
def test_any_change_of_content_changes_the_hash(change) -> None:
    X = features()
    assert frame_digest(change(X)) != frame_digest(X)


def test_tables_with_text_columns_hash_by_their_values() -> None:
    X = features().assign(site=list("aabbcc"))
    assert frame_digest(X) == frame_digest(X.copy())
    assert frame_digest(X) != frame_digest(X.assign(site=list("aabbcd")))
