"""Named albumentations pipelines (../shared/methods/protocol.md §2).

A method that needs different inputs asks for another named train transform; it never reaches into the
loader (style.md P2).
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


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


def inference(crop_size: int = 512, resize_long: tuple[int, int] = (320, 640)) -> A.Compose:
    """Full image at its original size, normalised (multi-scale happens in the model, protocol.md §4)."""
    del crop_size, resize_long  # same signature as the training pipelines
    return A.Compose([A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0), ToTensorV2()])


TRAIN_TRANSFORMS: dict[str, Callable[..., A.Compose]] = {"irn_cls": irn_classification, "irn_affinity": irn_affinity}


def build_train_transform(name: str, crop_size: int, resize_long: tuple[int, int]) -> A.Compose:
    """The named training pipeline; unknown names list the valid ones."""
    if name not in TRAIN_TRANSFORMS:
        raise ValueError(f"unknown train_transform {name!r}; expected one of {sorted(TRAIN_TRANSFORMS)}")
    return TRAIN_TRANSFORMS[name](crop_size=crop_size, resize_long=tuple(resize_long))
