"""Lightning modules that turn ROI crops into deep-feature embeddings."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import joblib
import pytorch_lightning as pl
import torch
from monai.data import Dataset, ThreadDataLoader
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["DeepFeatureExtractor", "PatientProgress", "ROIDataModule", "RankWriter",
           "loader_workers"]

_MAX_AUTO_WORKERS = 4


def loader_workers(setting: int | str, *, cpus: int | None = None,
                   threads: bool = False) -> int:
    """Data-loading workers for ``backbone.num_workers``: a number as given; ``auto``:
    processes on the cores beyond two (the forward passes' threads and the main process), at
    most 4, or with ``threads``, one thread per core.

    On 2 cores ``auto`` starts no process: loading processes only compete with the forward
    passes there (64 ROIs, ResNet50 fp32: 19.2 s with 2 workers, 20.3 s with none), and
    each forked worker maps the parent's resident pages again, which the tree's summed RSS
    counts once per process (peak 2.5 GB vs 1.1 GB; by PSS, which splits shared pages,
    1.7 vs 1.1 GB). Threads (fine-tuning's caching) share the process's memory.

    Args:
        setting: a non-negative int or ``"auto"``.
        cpus: cores available; None: those this process may use (``joblib.cpu_count``:
            affinity and container CPU quota).
        threads: the workers are threads, not processes.
    """
    if str(setting) != "auto":
        workers = int(setting)
        if workers < 0:
            msg = f"backbone.num_workers must be >= 0 or 'auto', got {setting!r}"
            raise ValueError(msg)
        return workers
    cpus = joblib.cpu_count() if cpus is None else cpus
    return cpus if threads else max(0, min(_MAX_AUTO_WORKERS, cpus - 2))


class ROIDataModule(pl.LightningDataModule):
    """Predict-only data: dictionaries of image/mask paths through the preprocessing chain.

    Args:
        items: one dictionary per patient with ``patient_id``, ``image`` and ``mask``.
        transform: the MONAI chain producing the ROI crop under ``image``.
        batch_size: ROIs per forward pass.
        num_workers: data-loading worker processes.
    """

    def __init__(self, items: Sequence[dict], transform, *, batch_size: int,
                 num_workers: int) -> None:
        super().__init__()
        self.items = list(items)
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        """Worker processes load the batches; without them (2 cores) one thread loads the
        next batch while the network runs on the current one (MONAI ``ThreadDataLoader``):
        128 patients, ResNet50 fp32, 2 cores: 20 s against 23-24 s loading in turn."""
        dataset = Dataset(self.items, self.transform)
        if self.num_workers == 0:
            return ThreadDataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                                    num_workers=0, buffer_size=1)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=False)


def _views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The first ``n`` of a fixed list of flips and quarter turns (deterministic TTA)."""
    spatial = tuple(range(2, x.ndim))
    last = (spatial[-2], spatial[-1])
    views = [x, torch.flip(x, (spatial[-1],)), torch.flip(x, (spatial[-2],)),
             torch.rot90(x, 1, last), torch.rot90(x, 3, last), torch.flip(x, last)]
    return views[: max(1, n)]


class DeepFeatureExtractor(pl.LightningModule):
    """Wrap a backbone for ``Trainer.predict``: normalise, forward, return embeddings.

    Args:
        backbone: a network returning ``(B, D)`` pooled embeddings.
        mean: per-channel input mean of the weights (inputs arrive in [0, 1]).
        std: per-channel input standard deviation.
        channels_last: use the channels-last memory format (faster CPU/GPU convolutions).
        tta_views: number of test-time views averaged (1 = no augmentation).
        compile_backbone: run the backbone through ``torch.compile`` (inductor). It pays a
            one-off compile (tens of seconds on 2 CPU cores) for faster batches, so it only
            helps cohorts large enough to amortise it; features match the eager ones to
            rounding.
        fold_batch_norm: predict with a copy of the backbone whose eval-mode batch norms are
            folded into the convolutions before them (``torch.fx``, computed in fp32, at
            :meth:`on_predict_start`: in each process of a spawned multi-device run, as an fx
            graph does not pickle): ResNet50 5-13 % more ROIs/s on CPU (the unfused norms
            took 16 % of its time), features within cosine 0.9999998 of the unfolded
            network's. For inference only: the copy has no ``layer4`` to hook.

    The fast CPU path is Lightning's ``precision="bf16-true"``: weights, buffers and inputs
    in bf16, with no per-layer autocast casts (``bf16-mixed``); ``forward`` returns fp32.
    """

    def __init__(self, backbone: torch.nn.Module, *, mean: Sequence[float],
                 std: Sequence[float], channels_last: bool = True, tta_views: int = 1,
                 compile_backbone: bool = False, fold_batch_norm: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.channels_last = channels_last
        self.tta_views = tta_views
        self.compile_backbone = compile_backbone
        self.fold_batch_norm = fold_batch_norm

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return x
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)

    def on_predict_start(self) -> None:
        self.backbone.eval()
        if self.fold_batch_norm:  # a copy: the caller's network keeps its norms
            dtype = next(self.backbone.parameters()).dtype
            with torch.inference_mode(False), torch.no_grad():
                folded = fuse(copy.deepcopy(self.backbone).float(), inplace=True)
            self.backbone = folded.to(dtype)
        if self.channels_last:
            probe = next(p for p in self.backbone.parameters() if p.ndim >= 4)
            fmt = torch.channels_last if probe.ndim == 4 else torch.channels_last_3d
            self.backbone.to(memory_format=fmt)
        if self.compile_backbone:  # in place: the state dict keeps its keys
            self.backbone.compile()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x = (x - self.mean.view(shape)) / self.std.view(shape)
        embeddings = [self.backbone(self._format(v)).float() for v in _views(x, self.tta_views)]
        return torch.stack(embeddings).mean(dim=0)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"patient_id": list(batch["patient_id"]),
                "features": self(batch["image"]).cpu()}


class RankWriter(BasePredictionWriter):
    """Save each rank's predictions to ``<folder>/rank<k>.pt`` (DDP prediction).

    Args:
        folder: where the ranks write.
    """

    def __init__(self, folder: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.folder = Path(folder)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        torch.save(predictions, self.folder / f"rank{trainer.global_rank}.pt")


class PatientProgress(pl.Callback):
    """A progress bar counted in patients, so its rate reads patients per second.

    Args:
        total: patients to embed.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: tqdm | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bar = tqdm(total=self.total, unit="patient", desc="Deep features",
                         disable=trainer.global_rank != 0)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                             dataloader_idx: int = 0) -> None:
        self._bar.update(len(outputs["patient_id"]))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bar.close()
