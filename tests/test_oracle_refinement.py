"""Oracle test of the refinement on real images (issue 4): CAMs made by degrading the ground truth of
voc12-mini (eroded, then blurred) go through CRF seeds and the random walk, with a boundary map from the
ground-truth edges standing in for IRNet, and come out better than they went in."""

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lit_wsss.cams import cams_to_mask
from lit_wsss.datamodules.files import read_mask, read_rgb
from lit_wsss.metrics import miou_from_confusion
from lit_wsss.refine.ir_labels import ir_label
from lit_wsss.refine.random_walk import random_walk, walk_scores

NUM_IMAGES = 6
C = 21


def confusion(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    valid = truth != 255
    return np.bincount(truth[valid].astype(np.int64) * C + prediction[valid], minlength=C * C).reshape(C, C)


def degraded_cams(mask: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Per labelled class: the object eroded by 25 px (CAMs miss object extent), blurred (sigma 12 px)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (51, 51))
    cams = []
    for key in keys:
        region = (mask == key + 1).astype(np.uint8)
        core = cv2.erode(region, kernel)
        if core.sum() < 0.05 * region.sum():  # thin objects: keep a seed of them
            core = cv2.erode(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
        blurred = cv2.GaussianBlur(core.astype(np.float32), (0, 0), 12)
        cams.append(blurred / max(blurred.max(), 1e-5))
    return np.stack(cams).astype(np.float32)


def ground_truth_boundary(mask: np.ndarray) -> torch.Tensor:
    """1 on class edges and on the 255 bands, max-pooled to the stride-4 grid of the random walk."""
    edge = (mask == 255).astype(np.float32)
    edge[:, 1:] = np.maximum(edge[:, 1:], mask[:, 1:] != mask[:, :-1])
    edge[1:, :] = np.maximum(edge[1:, :], mask[1:, :] != mask[:-1, :])
    pooled = F.max_pool2d(torch.from_numpy(edge)[None, None], 4, ceil_mode=True)[0, 0]
    return pooled


def test_crf_seeds_and_random_walk_improve_degraded_ground_truth(shared_data):
    root = shared_data / "voc12-mini"
    ids = (root / "val.txt").read_text().split()[:NUM_IMAGES]
    before = np.zeros((C, C), np.int64)
    after = np.zeros((C, C), np.int64)
    seeds_right = seeds_total = 0
    for image_id in ids:
        image = read_rgb(root / "JPEGImages" / f"{image_id}.jpg")
        mask = read_mask(root / "SegmentationClass" / f"{image_id}.png", image.shape[:2], 20)
        keys = np.array(sorted(int(v) - 1 for v in np.unique(mask) if 0 < v < 255))
        high_res = degraded_cams(mask, keys)
        height, width = mask.shape
        before += confusion(cams_to_mask(torch.from_numpy(high_res), torch.from_numpy(keys), 0.15).numpy(), mask)

        seeds = ir_label(image, high_res, keys)  # IRN's CRF seeds, 0.30 / 0.05
        confident = (seeds != 255) & (mask != 255)
        seeds_right += int((seeds[confident] == mask[confident]).sum())
        seeds_total += int(confident.sum())

        strided = F.interpolate(torch.from_numpy(high_res)[None], (math.ceil(height / 4), math.ceil(width / 4)),
                                mode="bilinear", align_corners=False)[0]
        strided /= strided.flatten(1).amax(1).view(-1, 1, 1) + 1e-5
        walked = random_walk(strided, ground_truth_boundary(mask))
        scores = walk_scores(walked, height, width)
        after += confusion(cams_to_mask(scores, torch.from_numpy(keys), 0.25).numpy(), mask)

    miou_before = miou_from_confusion(torch.from_numpy(before)).item()
    miou_after = miou_from_confusion(torch.from_numpy(after)).item()
    print(f"oracle: CAM mIoU {miou_before:.4f} -> random walk {miou_after:.4f}; seed precision {seeds_right / seeds_total:.4f}")
    assert seeds_total > 0 and seeds_right / seeds_total > 0.9  # confident seeds are mostly right
    assert miou_after > miou_before + 0.05, (miou_before, miou_after)
