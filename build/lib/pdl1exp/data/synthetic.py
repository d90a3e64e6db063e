"""A deterministic synthetic NSCLC cohort written to disk as a real manifest with CT files.

The latent model (all coefficients come from ``conf/dataset/synthetic.yaml``):

* tumour phenotype ``z = (size, heterogeneity, lobulation) ~ N(0, I)`` and an independent
  part-solid indicator; they set the phantom's diameter (log-normal, clipped to 5-30 mm),
  internal texture SD, margin lobulation and spicules, and ground-glass rim;
* clinical variables drawn independently of the phenotype: age, sex, smoking status and
  pack-years, histology, stage, CEA;
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

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.special import expit
from scipy.stats import rankdata

from pdl1exp.data.phantom import Phantom, ScanSpec, TumourSpec, render_ct

__all__ = ["GENERATOR_VERSION", "SyntheticCohort", "rank_auc"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
_HISTOLOGY = ("adenocarcinoma", "squamous", "other")
_STAGES = ("I", "II", "III", "IV")
_MC_SIZE = 400_000
_DRAW_BATCH = 4096


def rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    ranks = rankdata(score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class _Draws:
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


class SyntheticCohort:
    """Generate (or reuse) a synthetic cohort folder and return its manifest path.

    Args:
        n_patients: cohort size.
        prevalence: fraction of PD-L1 positive patients (TPS >= 1 %).
        seed: the cohort's seed; the same parameters and seed give the same bytes.
        cache_dir: folder holding one sub-folder per parameter hash.
        shape_xy: in-plane voxels of each crop.
        z_extent_mm: cranio-caudal extent; slices = extent / slice spacing.
        spacing_xy_mm: (low, high) in-plane spacing, drawn uniformly per patient.
        slice_spacings_mm: slice spacings drawn with equal probability.
        noise_hu: (low, high) quantum noise SD per patient.
        seed_fraction: patients given a seed point instead of a mask.
        formats: image format name (``nii.gz``, ``nrrd``, ``mha``, ``dicom``) -> probability.
        flipped_fraction: NIfTI/NRRD/MHA files written with a flipped (RAS-like) direction.
        pleural_fraction: tumours abutting the chest wall.
        vessel_fraction: tumours with a vessel running into them.
        centers: acquisition sites, assigned uniformly.
        effects: latent-model coefficients (see the module docstring).
        tps_scale: scale of the TPS mapping.
        n_jobs: worker processes used to render the volumes.
    """

    def __init__(self, *, n_patients: int, prevalence: float, seed: int, cache_dir: str,
                 shape_xy: tuple[int, int], z_extent_mm: float,
                 spacing_xy_mm: tuple[float, float], slice_spacings_mm: tuple[float, ...],
                 noise_hu: tuple[float, float], seed_fraction: float,
                 formats: Mapping[str, float], flipped_fraction: float,
                 pleural_fraction: float, vessel_fraction: float, centers: tuple[str, ...],
                 effects: Mapping[str, float], tps_scale: float, n_jobs: int = 1) -> None:
        self.params = {
            "n_patients": int(n_patients), "prevalence": float(prevalence), "seed": int(seed),
            "shape_xy": [int(v) for v in shape_xy], "z_extent_mm": float(z_extent_mm),
            "spacing_xy_mm": [float(v) for v in spacing_xy_mm],
            "slice_spacings_mm": [float(v) for v in slice_spacings_mm],
            "noise_hu": [float(v) for v in noise_hu], "seed_fraction": float(seed_fraction),
            "formats": {str(k): float(v) for k, v in formats.items()},
            "flipped_fraction": float(flipped_fraction),
            "pleural_fraction": float(pleural_fraction),
            "vessel_fraction": float(vessel_fraction), "centers": [str(c) for c in centers],
            "effects": {str(k): float(v) for k, v in effects.items()},
            "tps_scale": float(tps_scale), "version": GENERATOR_VERSION,
        }
        if not 0 < prevalence < 1:
            msg = f"dataset.generator.prevalence must be in (0, 1), got {prevalence}"
            raise ValueError(msg)
        if n_patients < 4:
            msg = f"dataset.generator.n_patients must be at least 4, got {n_patients}"
            raise ValueError(msg)
        unknown = set(self.params["formats"]) - {"nii.gz", "nrrd", "mha", "dicom"}
        if unknown:
            msg = f"dataset.generator.formats: unknown format(s) {sorted(unknown)}"
            raise ValueError(msg)
        self.cache_dir = Path(cache_dir)
        self.n_jobs = int(n_jobs)

    @property
    def key(self) -> str:
        """Hash of every parameter that changes the files."""
        blob = json.dumps(self.params, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def folder(self) -> Path:
        return self.cache_dir / self.key

    def write(self) -> Path:
        """Write the cohort unless a complete copy exists; return the manifest path."""
        folder = self.folder
        if (folder / "metadata.json").exists():
            log.info("Synthetic cohort reused from %s", folder)
            return folder / "manifest.csv"
        staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "images").mkdir(parents=True)
        (staging / "masks").mkdir()
        p = self.params
        log.info("Generating synthetic cohort: %d patients in %s", p["n_patients"], folder)
        rng = np.random.default_rng(p["seed"])
        moments, ceilings, intercept = self._population(np.random.default_rng([p["seed"], 1]))
        draws, labels, tps = self._select(rng, moments, intercept)
        patients = self._patients(rng, draws, labels, tps)
        jobs = [(staging, patient) for patient in patients]
        if self.n_jobs > 1:
            with ProcessPoolExecutor(self.n_jobs) as pool:
                rows = list(pool.map(_write_patient, jobs, chunksize=4))
        else:
            rows = [_write_patient(job) for job in jobs]
        manifest = pd.DataFrame(rows)
        manifest.to_csv(staging / "manifest.csv", index=False)
        oracle = {
            "image": rank_auc(labels, _eta(draws, moments, p["effects"], "image")),
            "clinical": rank_auc(labels, _eta(draws, moments, p["effects"], "clinical")),
            "combined": rank_auc(labels, _eta(draws, moments, p["effects"], "all")),
        }
        metadata = {
            "params": p, "key": self.key, "bayes_auc": ceilings, "cohort_oracle_auc": oracle,
            "intercept": intercept, "n_positive": int(labels.sum()),
            "n_negative": int((1 - labels).sum()),
        }
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2))
        if folder.exists():  # a concurrent writer finished first: keep theirs
            shutil.rmtree(staging)
        else:
            staging.rename(folder)
        return folder / "manifest.csv"

    def _draw(self, rng: np.random.Generator, n: int) -> _Draws:
        smoker = rng.random(n) < 0.7
        return _Draws(
            size=rng.standard_normal(n), heterogeneity=rng.standard_normal(n),
            lobulation=rng.standard_normal(n), part_solid=(rng.random(n) < 0.3).astype(float),
            age=np.clip(rng.normal(64.0, 9.0, n), 35, 88).round(),
            male=(rng.random(n) < 0.65).astype(float), smoker=smoker.astype(float),
            pack_years=np.where(smoker, rng.lognormal(np.log(30.0), 0.6, n), 0.0).round(1),
            histology=rng.choice(len(_HISTOLOGY), n, p=[0.6, 0.3, 0.1]),
            stage=rng.choice(len(_STAGES), n, p=[0.35, 0.2, 0.3, 0.15]),
            cea=rng.lognormal(np.log(4.0), 0.9, n).round(2),
            noise=rng.logistic(size=n),
        )

    def _population(self, rng: np.random.Generator) -> tuple[dict, dict, float]:
        """Standardisation moments, Bayes-optimal AUCs and the intercept for the prevalence."""
        draws = self._draw(rng, _MC_SIZE)
        moments = {name: (float(v.mean()), float(v.std()))
                   for name, v in _raw_predictors(draws).items()}
        eta = _eta(draws, moments, self.params["effects"], "all")
        low, high = -20.0, 20.0
        for _ in range(60):  # bisection: population prevalence = target
            mid = (low + high) / 2
            if expit(mid + eta).mean() < self.params["prevalence"]:
                low = mid
            else:
                high = mid
        intercept = (low + high) / 2
        labels = (intercept + eta + draws.noise > 0).astype(int)
        ceilings = {part: rank_auc(labels, _eta(draws, moments, self.params["effects"], part))
                    for part in ("image", "clinical", "all")}
        ceilings["combined"] = ceilings.pop("all")
        return moments, ceilings, intercept

    def _select(self, rng: np.random.Generator, moments: dict,
                intercept: float) -> tuple[_Draws, np.ndarray, np.ndarray]:
        """Draw until the exact numbers of positives and negatives are collected."""
        n = self.params["n_patients"]
        n_pos = round(self.params["prevalence"] * n)
        wanted = {1: n_pos, 0: n - n_pos}
        chosen: list[_Draws] = []
        t_chosen: list[np.ndarray] = []
        while wanted[0] + wanted[1] > 0:
            draws = self._draw(rng, _DRAW_BATCH)
            t = intercept + _eta(draws, moments, self.params["effects"], "all") + draws.noise
            positive = t > 0
            keep = np.zeros(_DRAW_BATCH, dtype=bool)
            for label, mask in ((1, positive), (0, ~positive)):
                idx = np.flatnonzero(mask)[: wanted[label]]
                keep[idx] = True
                wanted[label] -= idx.size
            chosen.append(_Draws(**{k: v[keep] for k, v in asdict(draws).items()}))
            t_chosen.append(t[keep])
        draws = _Draws(**{k: np.concatenate([getattr(d, k) for d in chosen])
                          for k in _Draws.__dataclass_fields__})
        t = np.concatenate(t_chosen)
        labels = (t > 0).astype(int)
        scale = self.params["tps_scale"]
        tps = np.where(t > 0, np.round(1 + 99 * (1 - np.exp(-np.maximum(t, 0) / scale))), 0)
        return draws, labels, tps

    def _patients(self, rng: np.random.Generator, d: _Draws, labels: np.ndarray,
                  tps: np.ndarray) -> list[dict[str, Any]]:
        """Per-patient rendering jobs (scan, tumour, files) plus their manifest fields."""
        p = self.params
        formats = list(p["formats"])
        weights = np.array([p["formats"][f] for f in formats])
        patients = []
        for i in range(p["n_patients"]):
            slice_mm = float(rng.choice(p["slice_spacings_mm"]))
            in_plane = round(float(rng.uniform(*p["spacing_xy_mm"])), 3)
            n_slices = max(8, round(p["z_extent_mm"] / slice_mm))
            scan = ScanSpec(shape=(p["shape_xy"][0], p["shape_xy"][1], n_slices),
                            spacing=(in_plane, in_plane, slice_mm),
                            noise_hu=round(float(rng.uniform(*p["noise_hu"])), 1))
            diameter = float(np.clip(np.exp(np.log(16.0) + 0.35 * d.size[i]), 5.0, 30.0))
            lob = float(expit(d.lobulation[i]))
            tumour = TumourSpec(
                diameter_mm=diameter, lobulation=0.05 + 0.3 * lob,
                n_spicules=int(rng.poisson(3.0 * lob)),
                heterogeneity_hu=float(8.0 + 40.0 * expit(d.heterogeneity[i])),
                solid_fraction=float(rng.uniform(0.3, 0.7)) if d.part_solid[i] else 1.0,
                attenuation_hu=float(rng.normal(35.0, 8.0)),
                location="pleural" if rng.random() < p["pleural_fraction"] else "central",
                vessel_attached=bool(rng.random() < p["vessel_fraction"]),
            )
            patients.append({
                "patient_id": f"SYN{i + 1:04d}",
                "scan": scan, "tumour": tumour,
                "rng_seed": [p["seed"], 2, i],
                "format": formats[int(rng.choice(len(formats), p=weights / weights.sum()))],
                "flipped": bool(rng.random() < p["flipped_fraction"]),
                "use_seed": bool(rng.random() < p["seed_fraction"]),
                "fields": {
                    "pdl1_tps": float(tps[i]),
                    "center": p["centers"][int(rng.integers(len(p["centers"])))],
                    "age": float(d.age[i]), "sex": "M" if d.male[i] else "F",
                    "smoking": "smoker" if d.smoker[i] else "never",
                    "pack_years": float(d.pack_years[i]),
                    "histology": _HISTOLOGY[int(d.histology[i])],
                    "stage": _STAGES[int(d.stage[i])], "cea": float(d.cea[i]),
                },
            })
        return patients


def _raw_predictors(d: _Draws) -> dict[str, np.ndarray]:
    """Every variable entering the linear predictor, before standardisation."""
    return {
        "size": d.size, "heterogeneity": d.heterogeneity, "lobulation": d.lobulation,
        "part_solid": d.part_solid, "age": d.age, "male": d.male,
        "pack_years": np.log1p(d.pack_years), "squamous": (d.histology == 1).astype(float),
        "stage": d.stage.astype(float), "cea": np.log(d.cea),
    }


_IMAGE_TERMS = ("size", "heterogeneity", "lobulation", "part_solid")


def _eta(d: _Draws, moments: dict, effects: Mapping[str, float], part: str) -> np.ndarray:
    """Linear predictor of the image, clinical or all (``part``) variables."""
    eta = np.zeros(len(d.size))
    for name, values in _raw_predictors(d).items():
        is_image = name in _IMAGE_TERMS
        if part == "all" or (part == "image") == is_image:
            mean, sd = moments[name]
            eta += effects.get(name, 0.0) * (values - mean) / (sd or 1.0)
    return eta


def _origin(phantom: Phantom) -> np.ndarray:
    """The origin at the 1 µm precision that DICOM's decimal strings carry."""
    return np.round(np.asarray(phantom.origin, dtype=float), 3)


def _image_from_phantom(phantom: Phantom, array: np.ndarray, flipped: bool) -> sitk.Image:
    """A SimpleITK image in the phantom's physical space, optionally with flipped x/y axes."""
    spacing, origin = phantom.spacing, _origin(phantom)
    if flipped:
        # Same physical content stored RAS-like: first voxel at the far x/y corner.
        array = array[:, ::-1, ::-1]
        extent = (np.array(array.shape[::-1]) - 1) * np.asarray(spacing)
        origin = origin + np.array([extent[0], extent[1], 0.0])
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(float(v) for v in origin))
    if flipped:
        image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return image


def _write_dicom(phantom: Phantom, folder: Path, patient_id: str, seed: list[int]) -> None:
    """Write the phantom as a CT series (unsigned pixels, rescale intercept -1024)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    entropy = [str(v) for v in seed]
    study, series, frame = (generate_uid(entropy_srcs=[*entropy, kind])
                            for kind in ("study", "series", "frame"))
    sx, sy, sz = phantom.spacing
    origin = _origin(phantom)
    for k, plane in enumerate(phantom.ct):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "sop", str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        # Synthetic but header-shaped identifiers: the reader must never carry these on.
        ds.PatientName = f"SYNTHETIC^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19600101"
        ds.StudyDate = "20240101"
        ds.InstanceNumber = k + 1
        position = origin + np.array([0.0, 0.0, k * sz])
        ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{sy:.3f}", f"{sx:.3f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{sz:.3f}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = (plane.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"slice_{k:04d}.dcm", enforce_file_format=True)


def _write_patient(job: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    """Render one patient, write its files and return its manifest row."""
    folder, patient = job
    pid = patient["patient_id"]
    phantom = render_ct(patient["scan"], patient["tumour"],
                        np.random.default_rng(patient["rng_seed"]))
    fmt = patient["format"]
    flipped = patient["flipped"] and fmt != "dicom"
    if fmt == "dicom":
        image_rel = f"images/{pid}"
        _write_dicom(phantom, folder / image_rel, pid, patient["rng_seed"])
    else:
        image_rel = f"images/{pid}.{fmt}"
        sitk.WriteImage(_image_from_phantom(phantom, phantom.ct, flipped),
                        str(folder / image_rel), useCompression=True, compressionLevel=1)
    row: dict[str, Any] = {"patient_id": pid, "image": image_rel, "mask": "", "seed": ""}
    if patient["use_seed"]:
        row["seed"] = ",".join(f"{v:.2f}" for v in phantom.seed_mm)
    else:
        row["mask"] = f"masks/{pid}.nii.gz"
        sitk.WriteImage(_image_from_phantom(phantom, phantom.mask, flipped),
                        str(folder / row["mask"]), useCompression=True, compressionLevel=1)
    # Ground truth kept beside the cohort for segmentation checks, never used for training.
    truth = folder / "truth"
    truth.mkdir(exist_ok=True)
    sitk.WriteImage(_image_from_phantom(phantom, phantom.mask, flipped),
                    str(truth / f"{pid}.nii.gz"), useCompression=True, compressionLevel=1)
    row.update(patient["fields"])
    return row
