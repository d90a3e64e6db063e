"""The synthetic cohort's latent model: population draws, PD-L1 status, Bayes ceilings.

Pure numpy (no files): :mod:`pdl1exp.data.synthetic` renders and writes what this draws.

* tumour phenotype ``z = (size, heterogeneity, lobulation) ~ N(0, I)`` and an independent
  part-solid indicator;
* clinical variables drawn independently of the phenotype from the ``population``
  distributions of ``conf/dataset/synthetic.yaml``: age, sex, smoking status and pack-years,
  histology, stage, CEA;
* a PD-L1 expression ``t = b0 + eta_image + eta_clinical + Logistic(0, 1)`` with
  ``eta_image = sum(effect_k * standardised phenotype_k)`` and likewise for the clinical
  variables, so ``P(positive | x) = sigmoid(b0 + eta)``; the tumour proportion score is
  ``TPS = 0`` for ``t < 0`` and ``1 + 99 (1 - exp(-t / tps_scale))`` percent otherwise, so
  TPS >= 1 % is exactly ``t > 0``.

Because image and clinical information are independent given the model, ranking by
``eta_image`` (``eta_clinical``, ``eta``) is Bayes-optimal for the image (clinical,
combined) information; their AUCs, estimated on a large seeded Monte-Carlo sample, are the
ceilings written to ``metadata.json``. Patients are drawn from the model until exactly
``round(prevalence * n)`` positives and the rest negatives are collected, which leaves
``P(x | y)`` unchanged and the prevalence exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import rankdata

__all__ = ["HISTOLOGY", "STAGES", "Draws", "LatentModel", "eta", "rank_auc", "raw_predictors"]

HISTOLOGY = ("adenocarcinoma", "squamous", "other")
STAGES = ("I", "II", "III", "IV")
_MC_SIZE = 400_000
_DRAW_BATCH = 4096
_IMAGE_TERMS = ("size", "heterogeneity", "lobulation", "part_solid")


def rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    ranks = rankdata(score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class Draws:
    """Latent and observed variables of a batch of patients (arrays of equal length)."""

    size: np.ndarray
    heterogeneity: np.ndarray
    lobulation: np.ndarray
    part_solid: np.ndarray
    age: np.ndarray
    male: np.ndarray
    smoker: np.ndarray
    pack_years: np.ndarray
    histology: np.ndarray
    stage: np.ndarray
    cea: np.ndarray
    noise: np.ndarray


class LatentModel:
    """Draw patients and their PD-L1 status from the latent model.

    Args:
        population: the distributions of ``conf/dataset/synthetic.yaml`` (``population``).
        effects: coefficient per standardised predictor.
        prevalence: fraction of positives in the population and in each cohort.
        tps_scale: scale of the TPS mapping.
    """

    def __init__(self, *, population: Mapping[str, Any], effects: Mapping[str, float],
                 prevalence: float, tps_scale: float) -> None:
        self.population = population
        self.effects = effects
        self.prevalence = prevalence
        self.tps_scale = tps_scale

    def draw(self, rng: np.random.Generator, n: int) -> Draws:
        """``n`` independent patients (phenotype, clinical variables, logistic noise)."""
        pop = self.population
        smoker = rng.random(n) < pop["smoker"]
        age, pack_years, cea = pop["age"], pop["pack_years"], pop["cea"]
        return Draws(
            size=rng.standard_normal(n), heterogeneity=rng.standard_normal(n),
            lobulation=rng.standard_normal(n),
            part_solid=(rng.random(n) < pop["part_solid"]).astype(float),
            age=np.clip(rng.normal(age["mean"], age["sd"], n), age["min"], age["max"]).round(),
            male=(rng.random(n) < pop["male"]).astype(float), smoker=smoker.astype(float),
            pack_years=np.where(smoker, rng.lognormal(np.log(pack_years["median"]),
                                                      pack_years["log_sd"], n), 0.0).round(1),
            histology=rng.choice(len(HISTOLOGY), n,
                                 p=[pop["histology"][h] for h in HISTOLOGY]),
            stage=rng.choice(len(STAGES), n, p=[pop["stage"][s] for s in STAGES]),
            cea=rng.lognormal(np.log(cea["median"]), cea["log_sd"], n).round(2),
            noise=rng.logistic(size=n),
        )

    def summary(self, rng: np.random.Generator) -> tuple[dict, dict, float]:
        """Standardisation moments, Bayes-optimal AUCs and the intercept for the prevalence,
        from a large Monte-Carlo sample."""
        draws = self.draw(rng, _MC_SIZE)
        moments = {name: (float(v.mean()), float(v.std()))
                   for name, v in raw_predictors(draws).items()}
        total = eta(draws, moments, self.effects, "all")
        low, high = -20.0, 20.0
        for _ in range(60):  # bisection: population prevalence = target
            mid = (low + high) / 2
            if expit(mid + total).mean() < self.prevalence:
                low = mid
            else:
                high = mid
        intercept = (low + high) / 2
        labels = (intercept + total + draws.noise > 0).astype(int)
        ceilings = {part: rank_auc(labels, eta(draws, moments, self.effects, part))
                    for part in ("image", "clinical", "all")}
        ceilings["combined"] = ceilings.pop("all")
        return moments, ceilings, intercept

    def select(self, rng: np.random.Generator, n: int, moments: dict,
               intercept: float) -> tuple[Draws, np.ndarray, np.ndarray]:
        """Draw until exactly ``round(prevalence * n)`` positives and the rest negatives are
        collected; return the draws, labels and TPS."""
        n_pos = round(self.prevalence * n)
        wanted = {1: n_pos, 0: n - n_pos}
        chosen: list[Draws] = []
        t_chosen: list[np.ndarray] = []
        while wanted[0] + wanted[1] > 0:
            draws = self.draw(rng, _DRAW_BATCH)
            t = intercept + eta(draws, moments, self.effects, "all") + draws.noise
            positive = t > 0
            keep = np.zeros(_DRAW_BATCH, dtype=bool)
            for label, mask in ((1, positive), (0, ~positive)):
                idx = np.flatnonzero(mask)[: wanted[label]]
                keep[idx] = True
                wanted[label] -= idx.size
            chosen.append(Draws(**{k: v[keep] for k, v in asdict(draws).items()}))
            t_chosen.append(t[keep])
        draws = Draws(**{k: np.concatenate([getattr(d, k) for d in chosen])
                         for k in Draws.__dataclass_fields__})
        t = np.concatenate(t_chosen)
        labels = (t > 0).astype(int)
        tps = np.where(t > 0, np.round(1 + 99 * (1 - np.exp(-np.maximum(t, 0)
                                                             / self.tps_scale))), 0)
        return draws, labels, tps


def raw_predictors(d: Draws) -> dict[str, np.ndarray]:
    """Every variable entering the linear predictor, before standardisation."""
    return {
        "size": d.size, "heterogeneity": d.heterogeneity, "lobulation": d.lobulation,
        "part_solid": d.part_solid, "age": d.age, "male": d.male,
        "pack_years": np.log1p(d.pack_years), "squamous": (d.histology == 1).astype(float),
        "stage": d.stage.astype(float), "cea": np.log(d.cea),
    }


def eta(d: Draws, moments: dict, effects: Mapping[str, float], part: str) -> np.ndarray:
    """Linear predictor of the image, clinical or all (``part``) variables."""
    total = np.zeros(len(d.size))
    for name, values in raw_predictors(d).items():
        is_image = name in _IMAGE_TERMS
        if part == "all" or (part == "image") == is_image:
            mean, sd = moments[name]
            total += effects.get(name, 0.0) * (values - mean) / (sd or 1.0)
    return total
