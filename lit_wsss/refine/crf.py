"""Dense-CRF post-processing of class probabilities (the segmentation stage's optional CRF).

The parameters are kazuto1011/deeplab-pytorch ``configs/voc12.yaml`` (``CRF``: 10 iterations, Gaussian
``POS_XY_STD`` 1 / ``POS_W`` 3, bilateral ``BI_XY_STD`` 67 / ``BI_RGB_STD`` 3 / ``BI_W`` 4) with the unary of its
``libs/utils/crf.py``: ``-log`` of the softmax probabilities. The CAM-seed CRF of IRN (label unary) is
``lit_wsss.refine.ir_labels.crf_inference_label``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: kazuto1011/deeplab-pytorch configs/voc12.yaml, section CRF.
DEEPLAB_CRF_PARAMS: dict[str, Any] = {
    "iterations": 10,
    "gaussian": {"sxy": 1, "compat": 3},
    "bilateral": {"sxy": 67, "srgb": 3, "compat": 4},
}


def crf_inference_softmax(image: np.ndarray, probabilities: np.ndarray,
                          params: dict[str, Any] | None = None) -> np.ndarray:
    """Mean-field dense CRF of per-pixel class probabilities.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        probabilities: ``(C, H, W)`` float, summing to 1 over ``C`` at every pixel.
        params: :data:`DEEPLAB_CRF_PARAMS` by default.

    Returns:
        ``(C, H, W)`` float32 refined probabilities.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    params = params or DEEPLAB_CRF_PARAMS
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    classes, height, width = probabilities.shape
    if (height, width) != image.shape[:2]:
        raise ValueError(f"probabilities are {height}x{width} but the image is {image.shape[0]}x{image.shape[1]}")
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=params["gaussian"]["sxy"], compat=params["gaussian"]["compat"])
    bilateral = params["bilateral"]
    crf.addPairwiseBilateral(sxy=bilateral["sxy"], srgb=bilateral["srgb"], rgbim=np.ascontiguousarray(image),
                             compat=bilateral["compat"])
    refined = np.array(crf.inference(params["iterations"]), dtype=np.float32)
    return refined.reshape(classes, height, width)
