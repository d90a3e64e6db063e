"""``python -m pdl1exp.promote registry.name=NAME``: the candidate becomes champion if it holds.

Both versions are compared on held-out data, their runs' test predictions: when they were
evaluated on the same test patients, by the paired one-sided DeLong test; otherwise by the
unpaired one (pROC ``roc.test(paired = FALSE)``). The rule
(``promote.require_higher_auc: true``): the candidate's AUC is at least the champion's and it
is not significantly worse (one-sided, ``promote.alpha``); with ``false`` only the second
part. Without a champion the candidate is promoted. The decision
and its numbers are written on the candidate version (tags and description) and printed;
``promote.dry_run=true`` only prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import hydra
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from scipy import stats

from pdl1exp.cli import run_command, user_errors
from pdl1exp.evaluation import delong_ci, delong_test, delong_test_unpaired
from pdl1exp.paths import CONFIG_DIR
from pdl1exp.serving import CANDIDATE, CHAMPION, held_out_predictions

__all__ = ["Decision", "decide", "main", "promote"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """Whether the candidate becomes champion, and why.

    Args:
        promote: move ``champion`` to the candidate.
        method: ``paired DeLong``, ``unpaired DeLong``, ``no champion`` or
            ``already champion``.
        reason: one sentence for people.
        numbers: AUCs, CIs, z and p of the comparison.
    """

    promote: bool
    method: str
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)


def _same_patients(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return set(a.index) == set(b.index) and a["label"].equals(b["label"].loc[a.index])


def decide(candidate: pd.DataFrame, champion: pd.DataFrame | None, *, alpha: float,
           require_higher_auc: bool = True) -> Decision:
    """Apply the promotion rule to two models' test predictions.

    Args:
        candidate: test predictions (index patient_id; ``label``, ``probability``).
        champion: the champion's, or None when there is none.
        alpha: one-sided significance level of "the candidate is worse".
        require_higher_auc: also require candidate AUC >= champion AUC.
    """
    if champion is None:
        return Decision(True, "no champion", "there is no champion yet")
    if _same_patients(candidate, champion):
        y = candidate["label"]
        cand, champ = candidate["probability"], champion["probability"].loc[candidate.index]
        z, _ = delong_test(y, cand, champ)
        p_worse = float(stats.norm.cdf(z))  # z = (AUC cand - AUC champ) / SE
        numbers = {"candidate_auc": delong_ci(y, cand)[0], "champion_auc": delong_ci(y, champ)[0],
                   "z": z, "p_worse": p_worse, "n_test": float(len(y))}
        method, worse = "paired DeLong", bool(p_worse < alpha)
        if np.isnan(p_worse):
            return Decision(False, method, "the DeLong test is undefined on this test set "
                            "(one class only)", numbers)
    else:
        # Different test patients: the unpaired DeLong test (pROC roc.test(paired = FALSE)).
        z, _ = delong_test_unpaired(candidate["label"], candidate["probability"],
                                    champion["label"], champion["probability"])
        p_worse = float(stats.norm.cdf(z))
        numbers = {"candidate_auc": delong_ci(candidate["label"], candidate["probability"])[0],
                   "champion_auc": delong_ci(champion["label"], champion["probability"])[0],
                   "z": z, "p_worse": p_worse, "n_test": float(len(candidate)),
                   "n_test_champion": float(len(champion))}
        method, worse = "unpaired DeLong", bool(p_worse < alpha)
        if np.isnan(p_worse):
            return Decision(False, method, "the DeLong test is undefined on a test set "
                            "(fewer than 2 patients of a class)", numbers)
    lower = numbers["candidate_auc"] < numbers["champion_auc"]
    detail = (f"AUC {numbers['candidate_auc']:.3f} vs champion {numbers['champion_auc']:.3f} "
              f"({method})")
    if worse:
        return Decision(False, method, f"significantly worse: {detail}", numbers)
    if require_higher_auc and lower:
        return Decision(False, method, f"lower AUC (not significantly): {detail}", numbers)
    return Decision(True, method, f"not significantly worse: {detail}", numbers)


def promote(*, name: str, alpha: float, require_higher_auc: bool = True,
            dry_run: bool = False) -> Decision:
    """Decide on ``name@candidate`` against ``name@champion``; record and apply unless dry run.

    Raises:
        LookupError: ``name`` is not registered or has no candidate.
    """
    client = MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        aliases = {}
    if CANDIDATE not in aliases:
        msg = (f"registered model {name!r} has no @{CANDIDATE} version in "
               f"{mlflow.get_tracking_uri()}: run an experiment first "
               f"(python -m pdl1exp +experiment=...) or check registry.name and tracking.uri")
        raise LookupError(msg)
    candidate = client.get_model_version(name, aliases[CANDIDATE])
    champion = client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None
    if champion is not None and champion.version == candidate.version:
        decision = Decision(False, "already champion",
                            f"version {candidate.version} is already @{CHAMPION}")
    else:
        decision = decide(held_out_predictions(candidate.run_id),
                          None if champion is None else held_out_predictions(champion.run_id),
                          alpha=alpha, require_higher_auc=require_higher_auc)
    against = f"champion version {champion.version}" if champion else "no champion"
    verdict = "PROMOTED" if decision.promote else "NOT PROMOTED"
    # The comparison selects a model on the test split: its test AUC is no longer an
    # unbiased estimate for the promoted model (report the nested-CV estimate instead).
    text = (f"{verdict}: {name} version {candidate.version} vs {against}: {decision.reason}; "
            f"alpha={alpha}, require_higher_auc={require_higher_auc}. The test split has now "
            "been used for a selection: its AUC is no longer an unbiased estimate."
            + "".join(f"\n  {k} = {v:.6g}" for k, v in decision.numbers.items()))
    print(("[dry run] " if dry_run else "") + text)
    if dry_run or decision.method == "already champion":
        return decision
    tags = {"promotion.decision": "promoted" if decision.promote else "rejected",
            "promotion.method": decision.method, "promotion.alpha": str(alpha),
            "promotion.champion_version": str(champion.version) if champion else "none",
            "promotion.test_split_used_for_selection": "true",
            **{f"promotion.{k}": f"{v:.6g}" for k, v in decision.numbers.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate.version, key, value)
    client.update_model_version(name, candidate.version, description=text)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return decision


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="promote")
@user_errors("promote", LookupError)
def command(cfg: DictConfig) -> None:
    """Promote (or not) and exit non-zero when there is nothing to promote."""
    logging.getLogger("pdl1exp").setLevel(cfg.log_level)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    promote(name=cfg.registry.name, alpha=cfg.promote.alpha,
            require_higher_auc=cfg.promote.require_higher_auc, dry_run=cfg.promote.dry_run)


def main() -> None:
    """``python -m pdl1exp.promote``: a user error prints its message alone and exits 2."""
    run_command(command)


if __name__ == "__main__":
    main()
