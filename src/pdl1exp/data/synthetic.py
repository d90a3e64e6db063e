"""A deterministic synthetic NSCLC cohort written to disk as a real manifest with CT files.

The latent model (:mod:`pdl1exp.data.latent`) draws each patient's phenotype, clinical
variables and PD-L1 status; this module turns the phenotype into a rendered CT phantom
(:mod:`pdl1exp.data.phantom`) in one of several file formats, with a mask or a seed point,
and writes the manifest and the Bayes ceilings (``metadata.json``). Every parameter,
population distributions included, comes from ``conf/dataset/synthetic.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.special import expit
from tqdm import tqdm

from pdl1exp.data.latent import HISTOLOGY, STAGES, Draws, LatentModel, eta, rank_auc
from pdl1exp.data.phantom import Phantom, ScanSpec, TumourSpec, render_ct
from pdl1exp.workers import n_workers

__all__ = ["GENERATOR_VERSION", "SyntheticCohort"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
_CHUNK = 4  # patients handed to a worker at a time


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
        scanners: center → scanner differences of that center's scans (``hu_offset``,
            ``noise_scale``, ``psf_mm``: the reconstruction kernel's blur); centers not
            named scan like the default.
        population: the latent model's population distributions (:mod:`pdl1exp.data.latent`).
        tumour: the phenotype → phantom mapping (diameter law, margin, texture).
        effects: latent-model coefficients (:mod:`pdl1exp.data.latent`).
        tps_scale: scale of the TPS mapping.
        n_jobs: worker processes rendering the volumes (:func:`~pdl1exp.workers.n_workers`:
            -1 one per core).
    """

    def __init__(self, *, n_patients: int, prevalence: float, seed: int, cache_dir: str,
                 shape_xy: tuple[int, int], z_extent_mm: float,
                 spacing_xy_mm: tuple[float, float], slice_spacings_mm: tuple[float, ...],
                 noise_hu: tuple[float, float], seed_fraction: float,
                 formats: Mapping[str, float], flipped_fraction: float,
                 pleural_fraction: float, vessel_fraction: float, centers: tuple[str, ...],
                 population: Mapping[str, Any], tumour: Mapping[str, Any],
                 effects: Mapping[str, float], tps_scale: float,
                 scanners: Mapping[str, Mapping[str, float]] | None = None,
                 n_jobs: int = 1) -> None:
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
            # Plain copies (Hydra passes them with `_convert_: all`): hashed into the key.
            "population": json.loads(json.dumps(population)),
            "tumour": json.loads(json.dumps(tumour)),
            "scanners": json.loads(json.dumps(scanners or {})),
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
        unknown = set(self.params["scanners"]) - set(self.params["centers"])
        if unknown:
            msg = f"dataset.generator.scanners names unknown center(s) {sorted(unknown)}"
            raise ValueError(msg)
        self.cache_dir = Path(cache_dir)
        self.n_jobs = n_workers(n_jobs, setting="dataset.generator.n_jobs")

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
        moments, ceilings, intercept, draws, labels, tps = self._latent(rng)
        patients = self._patients(rng, draws, labels, tps)
        jobs = [(staging, patient) for patient in patients]
        rows = []
        workers = min(self.n_jobs, math.ceil(len(jobs) / _CHUNK))  # a chunk each at least
        with (ProcessPoolExecutor(workers) if workers > 1 else nullcontext()) as pool, \
                tqdm(total=len(jobs), unit="patient", desc="Synthetic cohort") as bar:
            written = pool.map(_write_patient, jobs, chunksize=_CHUNK) if pool else map(
                _write_patient, jobs)
            for row in written:
                rows.append(row)
                bar.update()
        manifest = pd.DataFrame(rows)
        manifest.to_csv(staging / "manifest.csv", index=False)
        scores = self._oracle_scores(draws, moments)
        # Ground truth for checks on any subset of patients, never used for training.
        (staging / "truth").mkdir(exist_ok=True)
        scores.to_csv(staging / "truth" / "oracle.csv")
        oracle = {part: rank_auc(labels, scores[part].to_numpy()) for part in scores}
        metadata = {
            "params": p, "key": self.key, "bayes_auc": ceilings, "cohort_oracle_auc": oracle,
            "intercept": intercept, "n_positive": int(labels.sum()),
            "n_negative": int((1 - labels).sum()),
        }
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2))
        try:  # one atomic rename publishes the complete cohort
            staging.rename(folder)
        except OSError:  # a concurrent writer published first (a folder is never replaced)
            if not (folder / "metadata.json").exists():
                raise
            shutil.rmtree(staging)
        return folder / "manifest.csv"

    def _latent(self, rng: np.random.Generator) -> tuple[dict, dict, float, Draws, np.ndarray,
                                                          np.ndarray]:
        """Moments, ceilings and intercept of the population, then the cohort's draws, labels
        and TPS (``rng`` is the cohort's generator, advanced past the draws)."""
        p = self.params
        latent = LatentModel(population=p["population"], effects=p["effects"],
                             prevalence=p["prevalence"], tps_scale=p["tps_scale"])
        moments, ceilings, intercept = latent.summary(np.random.default_rng([p["seed"], 1]))
        return (moments, ceilings, intercept,
                *latent.select(rng, p["n_patients"], moments, intercept))

    def _oracle_scores(self, draws: Draws, moments: dict) -> pd.DataFrame:
        effects = self.params["effects"]
        index = pd.Index([f"SYN{i + 1:04d}" for i in range(len(draws.size))], name="patient_id")
        return pd.DataFrame({"image": eta(draws, moments, effects, "image"),
                             "clinical": eta(draws, moments, effects, "clinical"),
                             "combined": eta(draws, moments, effects, "all")}, index=index)

    def oracle(self) -> pd.DataFrame:
        """Each patient's Bayes-optimal scores (linear predictors of the image, clinical and
        all information; index patient_id), replayed from the seed without rendering: the
        ceiling on any subset of patients, e.g. a run's test split."""
        moments, _, _, draws, _, _ = self._latent(np.random.default_rng(self.params["seed"]))
        return self._oracle_scores(draws, moments)

    def _patients(self, rng: np.random.Generator, d: Draws, labels: np.ndarray,
                  tps: np.ndarray) -> list[dict[str, Any]]:
        """Per-patient rendering jobs (scan, tumour, files) plus their manifest fields."""
        p = self.params
        formats = list(p["formats"])
        weights = np.array([p["formats"][f] for f in formats])
        patients = []
        law = p["tumour"]
        for i in range(p["n_patients"]):
            slice_mm = float(rng.choice(p["slice_spacings_mm"]))
            in_plane = round(float(rng.uniform(*p["spacing_xy_mm"])), 3)
            n_slices = max(8, round(p["z_extent_mm"] / slice_mm))
            noise_hu = round(float(rng.uniform(*p["noise_hu"])), 1)
            diameter = float(np.clip(np.exp(np.log(law["diameter_median_mm"])
                                            + law["diameter_log_sd"] * d.size[i]),
                                     *law["diameter_range_mm"]))
            lob = float(expit(d.lobulation[i]))
            tumour = TumourSpec(
                diameter_mm=diameter,
                lobulation=law["lobulation"][0] + law["lobulation"][1] * lob,
                n_spicules=int(rng.poisson(law["spicules_per_lobulation"] * lob)),
                heterogeneity_hu=float(law["heterogeneity_hu"][0]
                                       + law["heterogeneity_hu"][1] * expit(d.heterogeneity[i])),
                solid_fraction=(float(rng.uniform(*law["solid_fraction"])) if d.part_solid[i]
                                else 1.0),
                attenuation_hu=float(rng.normal(*law["attenuation_hu"])),
                location="pleural" if rng.random() < p["pleural_fraction"] else "central",
                vessel_attached=bool(rng.random() < p["vessel_fraction"]),
            )
            fmt = formats[int(rng.choice(len(formats), p=weights / weights.sum()))]
            flipped = bool(rng.random() < p["flipped_fraction"])
            use_seed = bool(rng.random() < p["seed_fraction"])
            center = p["centers"][int(rng.integers(len(p["centers"])))]
            scanner = p["scanners"].get(center, {})
            scan = ScanSpec(shape=(p["shape_xy"][0], p["shape_xy"][1], n_slices),
                            spacing=(in_plane, in_plane, slice_mm),
                            noise_hu=noise_hu * scanner.get("noise_scale", 1.0),
                            **({"psf_mm": scanner["psf_mm"]} if "psf_mm" in scanner else {}))
            patients.append({
                "patient_id": f"SYN{i + 1:04d}",
                "scan": scan, "tumour": tumour, "hu_offset": scanner.get("hu_offset", 0.0),
                "rng_seed": [p["seed"], 2, i],
                "format": fmt, "flipped": flipped, "use_seed": use_seed,
                "fields": {
                    "pdl1_tps": float(tps[i]), "center": center,
                    "age": float(d.age[i]), "sex": "M" if d.male[i] else "F",
                    "smoking": "smoker" if d.smoker[i] else "never",
                    "pack_years": float(d.pack_years[i]),
                    "histology": HISTOLOGY[int(d.histology[i])],
                    "stage": STAGES[int(d.stage[i])], "cea": float(d.cea[i]),
                },
            })
        return patients


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
    if patient["hu_offset"]:  # a scanner whose calibration differs (external center)
        phantom = replace(phantom, ct=(phantom.ct + patient["hu_offset"]).astype(phantom.ct.dtype))
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

