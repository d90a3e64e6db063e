"""CT-like thoracic phantoms with one lung tumour, rendered in physical millimetres.

A phantom is a crop of a chest CT around one lung: air outside the body, a fat/muscle chest
wall, the mediastinum bulging in from one side, lung parenchyma at about -850 HU with a
gravity gradient, vessels and noise, and one tumour with an irregular (lobulated, optionally
spiculated) margin, internal texture and an optional ground-glass (part-solid) rim or air
cavity. The tumour can abut the pleura or the mediastinum (behind an optional mediastinal fat
plane), bulge into the mediastinum (hilar) or have a vessel running into it, the cases that
defeat naive region growing. Everything is drawn on voxel centres in millimetres, then
blurred by a scanner point-spread function and noised, so anisotropic spacing changes the
sampling, not the anatomy. Defaults render the phantoms of earlier versions bit for bit.

Example:
    >>> rng = np.random.default_rng(0)
    >>> ph = render_ct(ScanSpec(shape=(64, 64, 24), spacing=(1.0, 1.0, 2.0)),
    ...                TumourSpec(diameter_mm=12.0), rng)
    >>> ph.ct.shape, ph.mask.dtype
    ((24, 64, 64), dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["HU", "Phantom", "ScanSpec", "TumourSpec", "render_ct"]


@dataclass(frozen=True)
class _Tissue:
    air: float = -1000.0
    lung: float = -850.0
    fat: float = -100.0
    muscle: float = 45.0
    blood: float = 40.0
    ground_glass: float = -500.0


HU = _Tissue()
"""Nominal attenuation of each tissue in Hounsfield units."""

_LOCATIONS = ("central", "pleural", "mediastinal", "hilar")
# Spicules: length beyond the margin (fraction of the radius, uniform) and radius (mm).
_SPICULE_LENGTH = (0.4, 0.9)
_SPICULE_RADIUS_MM = 0.6


@dataclass(frozen=True)
class ScanSpec:
    """Acquisition geometry and image quality.

    Args:
        shape: voxels along (x, y, z).
        spacing: voxel size in mm along (x, y, z).
        noise_hu: standard deviation of the quantum noise.
        psf_mm: Gaussian point-spread-function sigma of the scanner.
        n_vessels: lung vessels drawn besides the tumour's own.
        mediastinal_fat_mm: thickness of the fat plane under the mediastinal pleura (0: none,
            the mediastinum is uniform soft tissue).
    """

    shape: tuple[int, int, int] = (128, 128, 48)
    spacing: tuple[float, float, float] = (0.8, 0.8, 1.5)
    noise_hu: float = 20.0
    psf_mm: float = 0.7
    n_vessels: int = 10
    mediastinal_fat_mm: float = 0.0


@dataclass(frozen=True)
class TumourSpec:
    """Tumour phenotype.

    Args:
        diameter_mm: nominal diameter of the tumour (before lobulation).
        lobulation: relative amplitude of the low-frequency margin irregularity (0 = sphere).
        n_spicules: thin spicules radiating from the margin.
        heterogeneity_hu: standard deviation of the internal texture of the solid part.
        texture_mm: correlation length of the internal texture.
        solid_fraction: volume fraction of the solid core; below 1 the rest is ground glass.
        attenuation_hu: mean attenuation of the solid part (about -550 for a pure
            ground-glass nodule).
        location: ``"central"`` (surrounded by lung), ``"pleural"`` (abutting the chest wall),
            ``"mediastinal"`` (abutting the mediastinum) or ``"hilar"`` (bulging into it).
        vessel_attached: draw a vessel that runs into the tumour.
        cavity_fraction: radius of an air cavity inside the tumour, as a fraction of its
            radius (0: none); the cavity belongs to the tumour's mask.
    """

    diameter_mm: float = 15.0
    lobulation: float = 0.15
    n_spicules: int = 0
    heterogeneity_hu: float = 15.0
    texture_mm: float = 1.5
    solid_fraction: float = 1.0
    attenuation_hu: float = 35.0
    location: str = "central"
    vessel_attached: bool = False
    cavity_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.location not in _LOCATIONS:
            msg = f"TumourSpec.location must be one of {_LOCATIONS}, got {self.location!r}"
            raise ValueError(msg)
        if not 0.0 <= self.cavity_fraction < 0.6:
            msg = f"TumourSpec.cavity_fraction must be in [0, 0.6), got {self.cavity_fraction}"
            raise ValueError(msg)
        if not 0.0 < self.solid_fraction <= 1.0:
            msg = f"TumourSpec.solid_fraction must be in (0, 1], got {self.solid_fraction}"
            raise ValueError(msg)


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom: arrays are indexed (z, y, x) like SimpleITK's numpy view.

    Args:
        ct: attenuation in HU (int16).
        mask: ground-truth tumour mask (uint8, 1 = tumour).
        spacing: voxel size in mm along (x, y, z).
        origin: physical position of voxel (0, 0, 0) in mm (x, y, z).
        seed_mm: a point inside the solid part of the tumour in mm (x, y, z).
    """

    ct: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    seed_mm: tuple[float, float, float]


def _grid(scan: ScanSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    """Voxel-centre coordinates in mm, centred on the field of view."""
    nx, ny, nz = scan.shape
    sx, sy, sz = scan.spacing
    origin = (-(nx - 1) * sx / 2, -(ny - 1) * sy / 2, -(nz - 1) * sz / 2)
    z, y, x = np.meshgrid(
        origin[2] + sz * np.arange(nz, dtype=np.float32),
        origin[1] + sy * np.arange(ny, dtype=np.float32),
        origin[0] + sx * np.arange(nx, dtype=np.float32),
        indexing="ij",
    )
    return x, y, z, origin


def _smooth_field(shape: tuple[int, ...], sigma_mm: float, spacing_zyx: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_mm``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                    sigma=sigma_mm / spacing_zyx)
    return field / max(float(field.std()), 1e-6)


def _box(x: np.ndarray, y: np.ndarray, z: np.ndarray, low: np.ndarray,
         high: np.ndarray) -> tuple[slice, slice, slice]:
    """The (z, y, x) slices of the voxel centres in the box from ``low`` to ``high`` (x, y, z
    in mm)."""
    def span(coordinates: np.ndarray, lo: float, hi: float) -> slice:
        inside = np.flatnonzero((coordinates >= lo) & (coordinates <= hi))
        return slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)

    return (span(z[:, 0, 0], low[2], high[2]), span(y[0, :, 0], low[1], high[1]),
            span(x[0, 0, :], low[0], high[0]))


def _near_segment(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray,
                  radius: float) -> np.ndarray:
    """Voxels whose centre lies closer than ``radius`` mm to the segment from ``a`` to ``b``,
    measured in the segment's bounding box widened by ``radius`` + 1 mm only."""
    spare = radius + 1.0
    box = _box(x, y, z, np.minimum(a, b) - spare, np.maximum(a, b) + spare)
    xs, ys, zs = x[box], y[box], z[box]
    ab = b - a
    t = ((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1] + (zs - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    near = np.zeros(x.shape, dtype=bool)
    near[box] = np.sqrt((xs - a[0] - t * ab[0]) ** 2 + (ys - a[1] - t * ab[1]) ** 2
                        + (zs - a[2] - t * ab[2]) ** 2) < radius
    return near


def _ellipse_level(x: np.ndarray, y: np.ndarray, cx: float, cy: float,
                   ax: np.ndarray | float, ay: np.ndarray | float) -> np.ndarray:
    """Elliptic level: < 1 inside the ellipse."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


def _anatomy(x: np.ndarray, y: np.ndarray, z: np.ndarray, rng: np.random.Generator,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Body, lung, chest-wall fat and mediastinum masks of a thoracic crop."""
    half_w, half_h = float(x.max()), float(y.max())
    half_z = max(float(z.max()), 1.0)
    taper = 1.0 - 0.08 * (z / half_z)  # the lung narrows towards the apex
    body = _ellipse_level(x, y, 0.0, 0.0, 1.15 * half_w, 1.1 * half_h) < 1.0
    inner_body = _ellipse_level(x, y, 0.0, 0.0, 1.15 * half_w - 9.0, 1.1 * half_h - 9.0) < 1.0
    cx = rng.uniform(-0.05, 0.05) * half_w
    cy = rng.uniform(-0.05, 0.05) * half_h
    lung = _ellipse_level(x, y, cx, cy, 0.88 * half_w * taper, 0.85 * half_h * taper) < 1.0
    mediastinum = _ellipse_level(x, y, -1.05 * half_w, rng.uniform(-0.2, 0.2) * half_h,
                                 0.45 * half_w, 0.6 * half_h) < 1.0
    lung &= ~mediastinum
    fat = body & ~inner_body
    return body, lung, fat, mediastinum


def _tumour_centre(lung: np.ndarray, mediastinum: np.ndarray, x: np.ndarray, y: np.ndarray,
                   z: np.ndarray, radius: float, spec: TumourSpec,
                   rng: np.random.Generator) -> np.ndarray:
    """A centre whose tumour lies inside the lung, or abuts the pleura or mediastinum."""
    sampling = _spacing_zyx(x, y, z)
    inside = _distance_inside(lung, sampling)
    if spec.location == "pleural":
        # Centre about 0.8 r from the pleura: the tumour touches and flattens on the wall.
        candidates = np.abs(inside - 0.8 * radius) < 0.75
    elif spec.location in ("mediastinal", "hilar"):
        # Mediastinal: like pleural, against the mediastinum. Hilar: centre 0.3 r from the
        # mediastinal pleura, bulging into the mediastinum outside the aerated lung's hull.
        offset = 0.8 if spec.location == "mediastinal" else 0.3
        to_mediastinum = ndimage.distance_transform_edt(~mediastinum, sampling=sampling)
        candidates = ((np.abs(inside - offset * radius) < 0.75)
                      & (to_mediastinum < inside + 1.0))
    else:
        candidates = inside > radius * 1.35 + 3.0
    # Keep away from the top and bottom slices so the tumour is fully in the field of view.
    z_ok = np.abs(z) < float(z.max()) - radius - 1.0
    idx = np.flatnonzero(candidates & z_ok)
    if idx.size == 0:
        idx = np.flatnonzero(inside == inside.max())
    pick = idx[rng.integers(idx.size)]
    return np.array([x.flat[pick], y.flat[pick], z.flat[pick]], dtype=np.float32)


def _distance_inside(mask: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """``distance_transform_edt(mask)``, computed in the mask's bounding box widened by one
    voxel: the same values (a voxel's nearest background voxel is never farther than the
    box's background rim, which clamping a farther one onto the box reaches), in about half
    the time of the whole volume's transform."""
    out = np.zeros(mask.shape)
    if not mask.any():
        return out
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    out[tuple(box)] = ndimage.distance_transform_edt(mask[tuple(box)], sampling=sampling)
    return out


def _spacing_zyx(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Voxel spacing (z, y, x) read back from the coordinate grids."""
    def step(a: np.ndarray, axis: int) -> float:
        return float(np.take(a, 1, axis=axis).flat[0] - np.take(a, 0, axis=axis).flat[0]) \
            if a.shape[axis] > 1 else 1.0
    return np.array([step(z, 0), step(y, 1), step(x, 2)], dtype=np.float32)


def _tumour_shape(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: np.ndarray,
                  radius: float, spec: TumourSpec,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tumour region and its normalised radial coordinate (0 at centre, 1 at the margin)."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    dist = np.sqrt(dx**2 + dy**2 + dz**2) + 1e-6
    margin = np.ones_like(dist)
    for _ in range(4):  # low-frequency lobulation as a sum of directional cosines
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        cos_angle = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / dist, -1.0, 1.0)
        margin += spec.lobulation / 2 * np.cos(rng.integers(2, 5) * np.arccos(cos_angle)
                                               + rng.uniform(0, 2 * np.pi))
    rho = dist / (radius * margin)
    region = rho <= 1.0
    for _ in range(spec.n_spicules):
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        length = radius * rng.uniform(*_SPICULE_LENGTH)
        region |= _near_segment(x, y, z, centre + 0.8 * radius * v,
                                centre + (radius + length) * v, _SPICULE_RADIUS_MM)
    return region, rho


def _tumour_box(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: np.ndarray,
                radius: float, spec: TumourSpec) -> tuple[slice, slice, slice]:
    """The (z, y, x) slices of every voxel :func:`_tumour_shape` can place in the tumour.

    The lobulated margin reaches at most ``radius * (1 + 2 |lobulation|)`` from the centre
    (four cosine terms of amplitude ``lobulation / 2``), a spicule ``radius`` times 1 + its
    longest length plus its own radius; 2 mm spare. From a lobulation of 0.5 the margin can
    vanish: the whole volume then.
    """
    lobulation = abs(spec.lobulation)
    if lobulation >= 0.5:
        return slice(None), slice(None), slice(None)
    reach = radius * (1.0 + 2.0 * lobulation)
    if spec.n_spicules:
        reach = max(reach, radius * (1.0 + _SPICULE_LENGTH[1]) + _SPICULE_RADIUS_MM)
    return _box(x, y, z, centre - reach - 2.0, centre + reach + 2.0)


def render_ct(scan: ScanSpec, tumour: TumourSpec, rng: np.random.Generator) -> Phantom:
    """Render one phantom CT and its ground-truth tumour mask.

    Args:
        scan: geometry and image quality.
        tumour: tumour phenotype.
        rng: the source of all randomness (same state ⇒ same phantom).
    """
    x, y, z, origin = _grid(scan)
    spacing_zyx = _spacing_zyx(x, y, z)
    body, lung, fat, mediastinum = _anatomy(x, y, z, rng)

    ct = np.full(x.shape, HU.air, dtype=np.float32)
    ct[body] = HU.muscle
    ct[fat] = HU.fat
    if scan.mediastinal_fat_mm > 0:
        depth = ndimage.distance_transform_edt(mediastinum, sampling=spacing_zyx)
        ct[mediastinum & body & (depth <= scan.mediastinal_fat_mm)] = HU.fat
    # Dependent (posterior, +y) lung is denser: the gravity gradient seen on supine CT.
    gradient = 40.0 * (y / max(float(y.max()), 1.0))
    parenchyma = HU.lung + gradient + 25.0 * _smooth_field(x.shape, 3.0, spacing_zyx, rng)
    ct[lung] = parenchyma[lung]

    radius = tumour.diameter_mm / 2
    centre = _tumour_centre(lung, mediastinum, x, y, z, radius, tumour, rng)

    vessels = np.zeros(x.shape, dtype=bool)
    half = np.array([x.max(), y.max(), z.max()], dtype=np.float32)
    for _ in range(scan.n_vessels):
        a = rng.uniform(-half, half).astype(np.float32)
        b = rng.uniform(-half, half).astype(np.float32)
        vessels |= _near_segment(x, y, z, a, b, rng.uniform(0.6, 2.0))
    if tumour.vessel_attached:
        direction = rng.standard_normal(3).astype(np.float32)
        direction /= np.linalg.norm(direction)
        far = centre + direction * (radius + rng.uniform(15.0, 30.0))
        vessels |= _near_segment(x, y, z, centre, far, rng.uniform(1.2, 2.0))
    vessels &= lung
    ct[vessels] = HU.blood

    # The shape in a box around the tumour (a quarter of a render's time over the whole
    # volume): outside it no voxel is tumour, and rho only matters inside the tumour.
    box = _tumour_box(x, y, z, centre, radius, tumour)
    inner, inner_rho = _tumour_shape(x[box], y[box], z[box], centre, radius, tumour, rng)
    region = np.zeros(x.shape, dtype=bool)
    region[box] = inner
    rho = np.full(x.shape, np.inf, dtype=inner_rho.dtype)
    rho[box] = inner_rho
    # A tumour stops at the chest wall and the mediastinum; a hilar one displaces the latter.
    region &= (lung | mediastinum) if tumour.location == "hilar" else lung
    texture = tumour.heterogeneity_hu * _smooth_field(x.shape, tumour.texture_mm,
                                                      spacing_zyx, rng)
    core = rho <= tumour.solid_fraction ** (1 / 3)
    solid = region & core
    ground_glass = region & ~core
    ct[solid] = tumour.attenuation_hu + texture[solid]
    ct[ground_glass] = HU.ground_glass + 0.5 * texture[ground_glass] + 3 * gradient[ground_glass]
    cavity = np.zeros(x.shape, dtype=bool)
    if tumour.cavity_fraction > 0:
        # Off-centre, as cavities usually are: the wall is thick on one side.
        offset = rng.standard_normal(3).astype(np.float32)
        offset *= 0.2 * radius / np.linalg.norm(offset)
        c = centre + offset
        cavity = region & (np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
                           < tumour.cavity_fraction * radius)
        ct[cavity] = HU.air

    ct = ndimage.gaussian_filter(ct, sigma=scan.psf_mm / spacing_zyx)
    ct += scan.noise_hu * rng.standard_normal(ct.shape).astype(np.float32)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)

    if cavity.any():  # the middle of the thick wall, clear of the cavity's blurred edge
        pick = int(np.argmax(ndimage.distance_transform_edt(solid & ~cavity,
                                                            sampling=spacing_zyx)))
    else:
        seed_candidates = np.flatnonzero(solid & (rho < 0.5))
        if seed_candidates.size == 0:
            seed_candidates = np.flatnonzero(region)
        pick = seed_candidates[np.argmin(rho.flat[seed_candidates])]
    seed = (float(x.flat[pick]), float(y.flat[pick]), float(z.flat[pick]))
    return Phantom(ct=ct, mask=region.astype(np.uint8), spacing=tuple(scan.spacing),
                   origin=tuple(float(o) for o in origin), seed_mm=seed)
