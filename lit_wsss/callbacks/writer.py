"""Prediction writers: one file (set) per image id, resumable, exactly once under DDP (style.md P7).

``ResumableWriter`` holds everything but the file format; ``CAMWriter`` writes CAMs
(``lit-wsss predict --config experiments/stages/predict_cams.yaml``), ``PseudoLabelWriter`` the IRN pseudo
labels (``experiments/stages/pseudo_labels.yaml``), ``SegmentationWriter`` the segmentation network's label
maps (``experiments/stages/segment.yaml``).

CAM files: ``<id>.npz`` in the format of :mod:`lit_wsss.cam_files` (its writer and readers live there);
``CAMWriter(ir_labels={...})`` also streams each image's IR labels (IRN's CRF step) into their own folder. Pseudo
labels: ``<id>.png`` (palette PNG, 0..C, 255) and ``<id>.npz``, a CAM file without ``cam`` whose ``high_res``
(float16) holds the walked scores normalised by their global max, so ``lit-wsss eval-cam`` sweeps the background
threshold without walking again.

Guarantees:
* each file appears atomically (temporary name, then rename) and is byte-reproducible;
* a rerun skips the ids whose file exists and finishes an interrupted run; leftover temporary files of a
  killed run are removed first;
* under DDP, predict's unrepeated sampler gives every id to exactly one rank; every rank records what it
  wrote in ``_shard_<rank>.json`` and rank 0 merges them into ``manifest.json``, failing if an id was
  written twice or is missing;
* one writer per folder: a second export into a folder that a live process is writing is refused, naming
  that process (``<out_dir>/.lock``, :func:`lit_wsss.io.acquire_folder_lock`; a killed run's lock is free);
* ``run.json`` pins the producer (method, checkpoint, hyperparameters): a rerun with another producer into
  the same folder is refused instead of mixing CAMs of two models;
* nothing is kept in memory (run predict with ``return_predictions: false``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from lit_wsss.cam_files import CAM_ARRAYS, CAM_DTYPES, cam_file_info, cam_path, write_cam_file
from lit_wsss.errors import FolderInUseError, OutputFolderError
from lit_wsss.inference import use_eager_backbone, use_frozen_backbone
from lit_wsss.io import (TMP_SUFFIX, acquire_folder_lock, palette_png_bytes, release_folder_lock, write_bytes_atomic,
                         write_json_atomic)
from lit_wsss.refine.ir_labels import IRLabelStream

MANIFEST = "manifest.json"
RUN_FILE = "run.json"


class ResumableWriter(BasePredictionWriter):
    """Write the records of ``predict_step`` (dicts with ``image_id``) to ``out_dir``, one id at a time.

    Subclasses define ``suffix`` (the file whose presence marks an id as finished; written last),
    ``write_record`` and ``image_info`` (per-id manifest entry).

    Args:
        out_dir: folder of the per-image files, ``manifest.json`` and ``run.json``.
        overwrite: recompute every id (files of an earlier producer are replaced) instead of resuming.
        frozen_backbone: on the CPU, run the backbone as a frozen, optimised graph while predicting
            (:func:`lit_wsss.inference.use_frozen_backbone`: the same maps up to rounding, checked on probes
            first; a backbone that fails the check runs eager). Recorded in ``run.json`` and the manifest as
            ``backbone_forward``. The experiment's stage files turn it on for CAM exports.
    """

    suffix = ".npz"
    stage = "predict"

    def __init__(self, out_dir: str, overwrite: bool = False, frozen_backbone: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.frozen_backbone = frozen_backbone
        self._backbone_forward = "eager"
        self._written: dict[str, list[int]] = {}
        self._all_ids: list[str] = []

    # --- before predicting: resume, producer check ---------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "predict_dataset", None)
        if dataset is None or not hasattr(dataset, "select"):
            raise RuntimeError("CAMWriter needs a lit_wsss DataModule whose predict_dataset supports select()")
        self._all_ids = list(dataset.image_ids)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputFolderError(f"out_dir {self.out_dir} is a file: expected a folder")
        # One writer per folder: a second one would delete this one's temporary files below. Rank 0 holds the
        # lock; every rank learns the outcome, so that all stop together instead of waiting in a barrier.
        refusal = None
        if trainer.is_global_zero:
            try:
                acquire_folder_lock(self.out_dir, self.stage)
            except FolderInUseError as error:
                refusal = str(error)
        refusal = trainer.strategy.broadcast(refusal, src=0)
        if refusal is not None:
            raise FolderInUseError(refusal)
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for leftover in [*self.out_dir.glob(f"*{TMP_SUFFIX}"), *self.out_dir.glob("_shard_*.json")]:
                leftover.unlink()
        trainer.strategy.barrier()
        # Every rank lists the finished files before any rank writes a new one.
        done = set() if self.overwrite else self.finished_ids()
        trainer.strategy.barrier()
        todo = [image_id for image_id in self._all_ids if image_id not in done]
        if len(self._all_ids) < trainer.world_size:
            raise ValueError(f"{len(self._all_ids)} images cannot be shared by {trainer.world_size} processes")
        if len(todo) < trainer.world_size:
            # A rank without a batch skips the predict hooks and their barriers: redo a few finished ids
            # (same bytes) so that every rank takes part.
            todo += [image_id for image_id in self._all_ids if image_id in done][: trainer.world_size - len(todo)]
        datamodule.predict_dataset = dataset.select(set(todo))
        self._written = {}

    def finished_ids(self) -> set[str]:
        """The ids a rerun skips: those whose ``suffix`` file exists."""
        return {p.stem for p in self.out_dir.glob(f"*{self.suffix}")}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The checkpoint is restored after setup(), so the producer is pinned here, before the first write.
        if self.frozen_backbone and hasattr(pl_module, "backbone"):
            self._backbone_forward = use_frozen_backbone(pl_module)
        run = self._producer(trainer, pl_module)
        self._check_producer(run)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            write_json_atomic(self.out_dir / RUN_FILE, run)

    def _producer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        protocol = pl_module.protocol() if hasattr(pl_module, "protocol") else {}
        for volatile in ("world_size", "accumulate_grad_batches", "effective_batch_size"):
            protocol.pop(volatile, None)  # resuming on another number of devices is fine
        return {
            "stage": self.stage,
            "producer": type(pl_module).__name__,
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "hparams": {k: v for k, v in dict(pl_module.hparams).items()},
            "protocol": protocol,
            "backbone_forward": self._backbone_forward,
        }

    def _check_producer(self, run: dict[str, Any]) -> None:
        previous = self.out_dir / RUN_FILE
        if self.overwrite or not previous.is_file():
            return
        before = json.loads(previous.read_text())
        now = json.loads(json.dumps(run, sort_keys=True, default=str))
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise OutputFolderError(
                f"{self.out_dir} holds CAMs of another producer (differs in {changed}, see {previous}); "
                "use a new out_dir or CAMWriter(overwrite=True)"
            )

    # --- while predicting --------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for record in prediction:
            self.write_record(record)
            self._written[record["image_id"]] = 1

    def write_record(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def image_info(self, image_id: str) -> dict[str, Any]:
        """The manifest entry of a finished id (read back from its files)."""
        raise NotImplementedError

    def manifest_extra(self, run: dict[str, Any]) -> dict[str, Any]:
        return {}

    # --- after predicting: shards -> manifest ------------------------------------------------------------
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_json_atomic(self.out_dir / f"_shard_{trainer.global_rank}.json", self._written)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self._write_manifest(trainer)
            release_folder_lock(self.out_dir)
        trainer.strategy.barrier()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        use_eager_backbone(pl_module)
        release_folder_lock(self.out_dir)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        use_eager_backbone(pl_module)
        release_folder_lock(self.out_dir)

    def _write_manifest(self, trainer: pl.Trainer) -> None:
        shards = sorted(self.out_dir.glob("_shard_*.json"))
        written_by_rank: dict[str, int] = {}
        seen: set[str] = set()
        for shard in shards:
            ids = json.loads(shard.read_text())
            duplicated = seen & set(ids)
            if duplicated:
                raise RuntimeError(f"CAMs written twice under DDP: {sorted(duplicated)[:5]}")
            seen |= set(ids)
            written_by_rank[shard.stem.removeprefix("_shard_")] = len(ids)
        missing = [i for i in self._all_ids if not (self.out_dir / f"{i}{self.suffix}").is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} files missing after predict, e.g. {missing[:5]}")
        images = {image_id: self.image_info(image_id) for image_id in self._all_ids}
        run = json.loads((self.out_dir / RUN_FILE).read_text())
        manifest = {
            **run,
            **self.manifest_extra(run),
            "format": f"see {type(self).__module__}.{type(self).__name__}",
            "count": len(images),
            "written_this_run": len(seen),
            "written_by_rank": written_by_rank,
            "world_size": trainer.world_size,
            "images": images,
        }
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        for shard in shards:
            shard.unlink()


class CAMWriter(ResumableWriter):
    """``<id>.npz`` CAM files (module docstring) from a CAM method's ``predict_step``.

    Args:
        dtype: ``float32`` (default, IRN's precision) or ``float16`` for ``high_res``, ``cam`` and ``bg``.
        store_high_res: ``False`` writes compact files without ``high_res``: readers upsample ``cam`` by the
            method's ``high_res_rule`` (:func:`lit_wsss.cam_files.high_res_from_cam`). IRNet reads only ``cam``;
            eval-cam and ir-labels see the upsampled maps (docs/benchmarks.md, "Compact CAM files").
        ir_labels: IR labels streamed from the export (issue 18), e.g. ``{out_dir: outputs/ir_labels, workers: 2}``
            plus any of ``fg``, ``bg``, ``convention`` (default: the method's), ``bg_factor``,
            ``crf_gaussian_compat``, ``max_pending`` (:class:`lit_wsss.refine.ir_labels.IRLabelStream`): each
            image's CRF runs in worker processes on the maps in memory while the network exports the next
            image; the folder equals what ``lit-wsss ir-labels`` makes from the finished CAM folder, manifest
            included. An id counts as finished when both its CAM file and its PNG exist.
        out_dir, overwrite, frozen_backbone: :class:`ResumableWriter`.
    """

    suffix = ".npz"
    stage = "cams"

    def __init__(self, out_dir: str, overwrite: bool = False, frozen_backbone: bool = False, dtype: str = "float32",
                 store_high_res: bool = True, ir_labels: dict[str, Any] | None = None) -> None:
        super().__init__(out_dir, overwrite=overwrite, frozen_backbone=frozen_backbone)
        if dtype not in CAM_DTYPES:
            raise ValueError(f"CAMWriter dtype must be one of {list(CAM_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.store_high_res = store_high_res
        self.ir_labels = dict(ir_labels) if ir_labels is not None else None
        self._high_res_rule: str | None = None
        self._stream: IRLabelStream | None = None
        self._image_paths: dict[str, Path] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and self.ir_labels is not None:
            self._stream = IRLabelStream.from_options(
                self.ir_labels, getattr(pl_module, "background_convention", "constant"))
            dataset = getattr(trainer.datamodule, "predict_dataset", None)
            if not hasattr(dataset, "image_paths"):
                raise ValueError("CAMWriter(ir_labels=...) needs a predict data set with image_paths (the CRF reads "
                                 "each image)")
            self._image_paths = dict(zip(dataset.image_ids, dataset.image_paths, strict=True))
        super().setup(trainer, pl_module, stage)

    def finished_ids(self) -> set[str]:
        done = super().finished_ids()
        return done if self._stream is None else {i for i in done if self._stream.finished(i)}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        if self._stream is None:
            return
        refusal = None  # as for the CAM folder: rank 0 holds the lock, every rank learns the outcome
        if trainer.is_global_zero:
            run = json.loads((self.out_dir / RUN_FILE).read_text())
            try:
                self._stream.open(self.out_dir, run, Path(trainer.datamodule.root), self._all_ids, self.overwrite)
            except (OSError, ValueError, RuntimeError) as error:
                refusal = str(error)
        refusal = trainer.strategy.broadcast(refusal, src=0)
        if refusal is not None:
            raise OutputFolderError(f"IR labels: {refusal}")
        self._stream.start()

    def _producer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        run = super()._producer(trainer, pl_module)
        self._high_res_rule = run.get("protocol", {}).get("cam", {}).get("high_res_rule", "padded")
        run["storage"] = {"dtype": self.dtype, "high_res": "stored" if self.store_high_res
                          else f"upsampled from cam by the reader ({self._high_res_rule})"}
        return run

    def write_record(self, record: dict[str, Any]) -> None:
        dtype = CAM_DTYPES[self.dtype]
        arrays = {name: _to_numpy(record[name]) for name in CAM_ARRAYS if name in record}
        write_cam_file(cam_path(self.out_dir, record["image_id"]), arrays, high_res_dtype=dtype, cam_dtype=dtype,
                       high_res_rule=None if self.store_high_res else self._high_res_rule)
        if self._stream is not None:
            image_id = record["image_id"]
            self._stream.submit(image_id, self._image_paths[image_id], arrays["keys"].astype(np.int64),
                                arrays["high_res"], arrays.get("bg"))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stream is not None:
            error = None
            try:
                self._stream.wait()
            except Exception as raised:  # noqa: BLE001 - every rank must learn of it before the barriers below
                error = raised
            failed = trainer.strategy.reduce(torch.tensor(float(error is not None)), reduce_op="sum")
            if error is not None:
                raise OutputFolderError(f"IR labels: {error}") from error
            if float(failed) > 0:
                raise OutputFolderError("IR labels failed in another process (its error is reported there)")
        super().on_predict_epoch_end(trainer, pl_module)
        if self._stream is not None and trainer.is_global_zero:
            manifest = json.loads((self.out_dir / MANIFEST).read_text())
            self._stream.close(manifest, written=int(manifest["written_this_run"]))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._stream is not None:
            self._stream.stop()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream = None
        super().teardown(trainer, pl_module, stage)

    def image_info(self, image_id: str) -> dict[str, Any]:
        return cam_file_info(cam_path(self.out_dir, image_id))

    def manifest_extra(self, run: dict[str, Any]) -> dict[str, Any]:
        cam = run.get("protocol", {}).get("cam", {})
        extra = {"bg_threshold": cam.get("bg_threshold"), "high_res_rule": cam.get("high_res_rule")}
        if self._stream is not None:
            extra["ir_labels"] = str(self._stream.out_dir)
        return extra


class PseudoLabelWriter(ResumableWriter):
    """``<id>.png`` pseudo labels + ``<id>.npz`` walked scores (module docstring) from ``IRN.predict_step``."""

    suffix = ".png"
    stage = "pseudo-labels"

    def write_record(self, record: dict[str, Any]) -> None:
        image_id = record["image_id"]
        # "bg": the walked background of an explicit-background method (SIPE)
        write_cam_file(cam_path(self.out_dir, image_id),
                       {name: _to_numpy(record[name]) for name in ("keys", "high_res", "bg") if name in record},
                       high_res_dtype=np.float16)
        # the PNG marks the id as finished, so it is written last
        write_bytes_atomic(self.out_dir / f"{image_id}.png", palette_png_bytes(_to_numpy(record["labels"])))

    def image_info(self, image_id: str) -> dict[str, Any]:
        return cam_file_info(cam_path(self.out_dir, image_id))

    def manifest_extra(self, run: dict[str, Any]) -> dict[str, Any]:
        return {"bg_threshold": run.get("protocol", {}).get("irn", {}).get("sem_seg_bg_threshold")}


class SegmentationWriter(ResumableWriter):
    """``<id>.png`` palette label maps (0 background, c + 1 class c) from ``DeepLab.predict_step``; score them
    with ``lit-wsss eval-seg``. The manifest carries the producer's protocol (weights, training labels, CRF)."""

    suffix = ".png"
    stage = "segmentation"

    def write_record(self, record: dict[str, Any]) -> None:
        write_bytes_atomic(self.out_dir / f"{record['image_id']}.png", palette_png_bytes(_to_numpy(record["labels"])))

    def image_info(self, image_id: str) -> dict[str, Any]:
        from PIL import Image

        with Image.open(self.out_dir / f"{image_id}.png") as png:
            return {"size": [png.height, png.width]}

    def manifest_extra(self, run: dict[str, Any]) -> dict[str, Any]:
        return {"crf": run.get("protocol", {}).get("segmentation", {}).get("crf")}


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        # float() first: numpy has no bfloat16 (precision bf16-mixed), and files store float32 / float16
        return value.float().numpy() if value.is_floating_point() else value.numpy()
    return np.asarray(value)
