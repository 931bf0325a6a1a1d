"""Named albumentations pipelines (../shared/methods/protocol.md §2).

A method that needs different inputs asks for another named train transform; it never reaches into the
loader (style.md P2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from lit_wsss.io import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalise_flip_crop(crop_size: int) -> list:
    """IRN's common tail: normalise BEFORE flip and crop, so that the zero padding equals the mean colour;
    flip p=0.5; a random crop, smaller images placed at a random offset in a canvas (image 0, mask 255)."""
    return [
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
        A.HorizontalFlip(p=0.5),
        A.PadIfNeeded(
            min_height=crop_size, min_width=crop_size, position="random",
            border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
        ToTensorV2(),
    ]


def irn_classification(crop_size: int = 512, resize_long: tuple[int, int] = (320, 640)) -> A.Compose:
    """IRN classifier training augmentation (``voc12/dataloader.py``, protocol.md §2).

    Random long side ``L ~ UniformInt[resize_long]`` with isotropic bicubic rescale; normalise BEFORE flip
    and crop so that the zero padding equals the mean colour; horizontal flip p=0.5; a random
    ``crop_size`` crop, an image smaller than the crop being placed at a random offset in a zero canvas
    (mask padding 255). No colour jitter. Deviation: OpenCV bicubic instead of PIL bicubic.
    """
    low, high = resize_long
    resize = A.LongestMaxSize(max_size=list(range(low, high + 1)), interpolation=cv2.INTER_CUBIC)
    return A.Compose([resize, *_normalise_flip_crop(crop_size)])


def irn_affinity(crop_size: int = 512, resize_long: tuple[int, int] = (320, 640)) -> A.Compose:
    """IRNet training augmentation (``step/train_irn.py``, protocol.md §2): isotropic scale s ~ U(0.5, 1.5)
    (image bicubic, IR label nearest), normalise, horizontal flip, random ``crop_size`` crop with image fill 0
    and label fill 255. ``resize_long`` is unused (same signature as the other pipelines)."""
    del resize_long
    scale = A.RandomScale(
        scale_limit=(-0.5, 0.5), interpolation=cv2.INTER_CUBIC, mask_interpolation=cv2.INTER_NEAREST, p=1.0
    )
    return A.Compose([scale, *_normalise_flip_crop(crop_size)])


def deeplab(crop_size: int = 321, resize_long: tuple[int, int] = (320, 640)) -> A.Compose:
    """Segmentation-network training augmentation (kazuto1011/deeplab-pytorch ``configs/voc12.yaml``): isotropic
    scale s ~ U(0.5, 1.5) (image bicubic, labels nearest), normalise (padding = mean colour), horizontal flip,
    random ``crop_size`` crop with label fill 255. The same pipeline as :func:`irn_affinity`; kazuto1011 draws
    s from {0.5, 0.75, 1, 1.25, 1.5} and uses bilinear image resizing. ``resize_long`` is unused."""
    return irn_affinity(crop_size, resize_long)


def inference(crop_size: int = 512, resize_long: tuple[int, int] = (320, 640)) -> A.Compose:
    """Full image at its original size, normalised (multi-scale happens in the model, protocol.md §4)."""
    del crop_size, resize_long  # same signature as the training pipelines
    return A.Compose([A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0), ToTensorV2()])


def denormalise(image: torch.Tensor) -> np.ndarray:
    """The uint8 RGB ``(H, W, 3)`` of an ImageNet-normalised ``(3, H, W)`` tensor (exact up to rounding): what
    image-space refinements (dense CRF) need back from a batch."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    rgb = ((image.float() * std + mean) * 255.0).round().clamp(0, 255)
    return rgb.byte().permute(1, 2, 0).contiguous().cpu().numpy()


class WithInImageMask:
    """Runs a pipeline with an all-ones helper mask and returns where it stayed 1 as ``valid`` (bool H x W).

    The crop padding of :func:`_normalise_flip_crop` fills masks with 255, so ``valid`` marks the pixels of
    the crop that come from the image: SIPE's valid mask (sipe.md §2, ``data/data_voc.py``). Training
    splits have no ground-truth mask, so the helper mask is free to use.
    """

    def __init__(self, pipeline: A.Compose) -> None:
        self.pipeline = pipeline

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        if "mask" in inputs:
            raise ValueError("the in-image mask uses the mask slot; it is for training splits without masks")
        image = inputs["image"]
        out = self.pipeline(image=image, mask=np.ones(image.shape[:2], np.uint8))
        valid = out.pop("mask")
        out["valid"] = torch.as_tensor(np.asarray(valid) == 1)
        return out

    def set_random_seed(self, seed: int) -> None:
        """Forwarded to the pipeline (see ``seed_worker``)."""
        self.pipeline.set_random_seed(seed)


def irn_classification_valid(crop_size: int = 512, resize_long: tuple[int, int] = (320, 640)) -> WithInImageMask:
    """:func:`irn_classification` plus the in-image ``valid`` mask of SIPE (sipe.md §2, §4)."""
    return WithInImageMask(irn_classification(crop_size, resize_long))


class WithComplementaryPatches:
    """Runs a pipeline, then draws CPN's complementary-pair keep mask on the normalised crop (cpn.md §4).

    Adds ``patch_keep`` (bool H x W, True = kept in ``x1``) and ``rho`` (float); the module builds
    ``x1 = x * m`` and ``x2 = x * (1 - m)``. The draw uses its own numpy generator, reseeded per worker and
    rank by ``seed_worker`` through :meth:`set_random_seed`, so augmentation streams stay reproducible.

    Args:
        pipeline: the albumentations pipeline producing the normalised CHW crop.
        strategy: ``superpixel`` (official default: SLIC, 300 segments) or ``grid``.
        crop_size: grid cells are ``crop/2`` and ``crop`` (the official 224 and 448 at 448 crops).
    """

    def __init__(self, pipeline: A.Compose, strategy: str, crop_size: int) -> None:
        if strategy not in ("superpixel", "grid"):
            raise ValueError(f"unknown complementary patch strategy {strategy!r}: expected superpixel or grid")
        self.pipeline, self.strategy, self.crop_size = pipeline, strategy, int(crop_size)
        self.rng = np.random.default_rng(0)

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        from lit_wsss.datamodules.complementary import grid_hide_mask, superpixel_hide_mask

        out = self.pipeline(**inputs)
        image = out["image"]
        if self.strategy == "superpixel":
            keep, rho = superpixel_hide_mask(image, self.rng)
        else:
            keep, rho = grid_hide_mask(image.shape[-2], image.shape[-1], self.rng,
                                       cell_sizes=(self.crop_size // 2, self.crop_size))
        out["patch_keep"], out["rho"] = torch.from_numpy(np.ascontiguousarray(keep)), float(rho)
        return out

    def set_random_seed(self, seed: int) -> None:
        """Reseeds the pipeline and the patch generator (see ``seed_worker``)."""
        self.pipeline.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)


def cpn_pipeline(crop_size: int = 448, resize_long: tuple[int, int] = (448, 768)) -> A.Compose:
    """CPN's augmentation before the pair (``train_cpn.py``, cpn.md §6): random long side
    ``U_int[resize_long]`` (bicubic), colour jitter (0.3, 0.3, 0.3, 0.1), normalise, flip, random crop with
    zero fill. The official order flips before the jitter; both are per-image and independent, so the
    distribution is the same. Deviation: OpenCV bicubic instead of PIL bicubic."""
    low, high = resize_long
    resize = A.LongestMaxSize(max_size=list(range(low, high + 1)), interpolation=cv2.INTER_CUBIC)
    jitter = A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, p=1.0)
    return A.Compose([resize, jitter, *_normalise_flip_crop(crop_size)])


def cpn_superpixel(crop_size: int = 448, resize_long: tuple[int, int] = (448, 768)) -> WithComplementaryPatches:
    """:func:`cpn_pipeline` + superpixel complementary patches (CPN's default)."""
    return WithComplementaryPatches(cpn_pipeline(crop_size, resize_long), "superpixel", crop_size)


def cpn_grid(crop_size: int = 448, resize_long: tuple[int, int] = (448, 768)) -> WithComplementaryPatches:
    """:func:`cpn_pipeline` + grid complementary patches (CPN's alternative)."""
    return WithComplementaryPatches(cpn_pipeline(crop_size, resize_long), "grid", crop_size)


TRAIN_TRANSFORMS: dict[str, Callable[..., Any]] = {
    "irn_cls": irn_classification,
    "irn_cls_valid": irn_classification_valid,
    "irn_affinity": irn_affinity,
    "deeplab": deeplab,
    "cpn_superpixel": cpn_superpixel,
    "cpn_grid": cpn_grid,
}


def build_train_transform(name: str, crop_size: int, resize_long: tuple[int, int]) -> Any:
    """The named training pipeline; unknown names list the valid ones."""
    if name not in TRAIN_TRANSFORMS:
        raise ValueError(f"unknown train_transform {name!r}; expected one of {sorted(TRAIN_TRANSFORMS)}")
    return TRAIN_TRANSFORMS[name](crop_size=crop_size, resize_long=tuple(resize_long))
