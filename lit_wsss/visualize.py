"""Figures saved as PNG and logged to W&B: the CAM panel of a validation image.

matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lit_wsss.io import voc_colormap  # noqa: E402


def colorize_mask(mask: np.ndarray) -> np.ndarray:
    """Segmentation ids -> RGB with the VOC colour map (255 = ignore is light grey-yellow, as in VOC)."""
    return voc_colormap()[mask.astype(np.uint8)]


def figure_to_rgb(figure: plt.Figure) -> np.ndarray:
    """Render a matplotlib figure to an (H, W, 3) uint8 array and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    buffer.seek(0)
    rgba = plt.imread(buffer)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def cam_panel(
    image: np.ndarray,
    high_res: np.ndarray,
    keys: np.ndarray,
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    title: str = "",
) -> np.ndarray:
    """One row: image, a heat map per labelled class, predicted mask, ground-truth mask (class names in titles).

    Args:
        image: (H, W, 3) uint8 RGB.
        high_res: (K, H, W) CAMs in [0, 1].
        keys: (K,) 0-based foreground class indices.
        prediction, ground_truth: (H, W) segmentation ids (0 background, 255 ignore).
        class_names: foreground class names (index = key).
    """
    columns = 3 + len(keys)
    figure, axes = plt.subplots(1, columns, figsize=(2.4 * columns, 2.6))
    axes = np.atleast_1d(axes)
    axes[0].imshow(image)
    axes[0].set_title(title or "image", fontsize=8)
    for axis, cam, key in zip(axes[1:], high_res, keys):
        axis.imshow(image)
        axis.imshow(cam, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        axis.set_title(f"CAM {class_names[int(key)]}", fontsize=8)
    for axis, mask, name in ((axes[-2], prediction, "prediction"), (axes[-1], ground_truth, "ground truth")):
        axis.imshow(colorize_mask(mask))
        present = [int(v) for v in np.unique(mask) if 0 < v <= len(class_names)]
        axis.set_title(f"{name}: " + (", ".join(class_names[v - 1] for v in present) or "background"), fontsize=7)
    for axis in axes:
        axis.axis("off")
    return figure_to_rgb(figure)
