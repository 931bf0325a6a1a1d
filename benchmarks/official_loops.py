"""The official algorithms as their own processes, for ``benchmarks/speed_vs_official.py``.

Written from ../shared/methods/protocol.md (the official code is not available here), structured as the official
scripts are: one image at a time, in one process, reading the official per-image ``.npy`` CAM dicts.

* ``eval``: IRN ``step/eval_cam.py`` (§5) once per threshold, as a sweep with the official script means: for
  every threshold, every CAM file and mask is read again, the background plane is padded in front of
  ``high_res``, argmax, mapped through ``(0, keys + 1)``, one confusion over all pixels (255 ignored); the
  per-class IoU nan-mean. Prints one JSON line ``{"miou": [...]}``.
* ``ir``: IRN ``step/cam_to_ir_label.py`` (§6.1) on one process: fg/bg planes 0.30 / 0.05, IRN's dense CRF on
  each, combined into ``<id>.png`` (0..C, 255).
* ``cam``: IRN ``step/make_cam.py`` (§4) on the CPU: ``VOC12ClassificationDatasetMSF`` (PIL bicubic rescale of the
  uint8 image, ImageNet normalisation, the image stacked with its flip) in a DataLoader with IRN's
  ``num_workers = cpu_count // 2``; per scale the ``resnet50_cam.CAM`` forward (ReLU, then ``A[0] + flip(A[1])``)
  over all classes; every class resized to the strided and the 16-padded size and summed; the labelled classes
  kept and max-normalised; one pickled ``<id>.npy`` dict per image. The network is torchvision's ResNet-50 with
  IRN's strides (2, 2, 2, 1) and the 1x1 classifier, loaded from a lit_wsss checkpoint (``backbone.*``,
  ``classifier.weight``): the same weights on both sides.

Only numpy, PIL, pydensecrf (ir) and torch/torchvision (cam, as IRN) are imported: these are not lit_wsss, they
are what lit_wsss is measured against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def read_official_cam(path: Path) -> dict:
    # The official format is a pickled dict; these files are written by the benchmark itself.
    return np.load(path, allow_pickle=True).item()


def eval_cam(cams: Path, masks: Path, ids: list[str], thresholds: list[float], num_classes: int) -> list[float]:
    n = num_classes + 1
    mious = []
    for threshold in thresholds:
        confusion = np.zeros((n, n), np.int64)
        for image_id in ids:
            record = read_official_cam(cams / f"{image_id}.npy")
            planes = np.pad(record["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant",
                            constant_values=threshold)
            keys = np.pad(record["keys"] + 1, (1, 0), mode="constant")
            prediction = keys[np.argmax(planes, axis=0)]
            gt = np.array(Image.open(masks / f"{image_id}.png")).astype(np.int64)
            valid = gt != 255
            confusion += np.bincount(n * gt[valid] + prediction[valid], minlength=n * n).reshape(n, n)
        diagonal = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - diagonal
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = diagonal / union
        mious.append(float(np.nanmean(iou)))
    return mious


def crf_inference_label(image: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image), compat=10)
    q = crf.inference(10)
    return np.argmax(np.array(q).reshape((n_labels, height, width)), axis=0)


def ir_labels(cams: Path, images: Path, ids: list[str], out: Path, fg: float = 0.30, bg: float = 0.05) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        image = np.array(Image.open(images / f"{image_id}.jpg").convert("RGB"))
        record = read_official_cam(cams / f"{image_id}.npy")
        keys = np.pad(record["keys"] + 1, (1, 0), mode="constant")
        fg_conf = keys[crf_inference_label(image, np.argmax(np.pad(record["high_res"], ((1, 0), (0, 0), (0, 0)),
                                                                   mode="constant", constant_values=fg), 0),
                                           keys.shape[0])]
        bg_conf = keys[crf_inference_label(image, np.argmax(np.pad(record["high_res"], ((1, 0), (0, 0), (0, 0)),
                                                                   mode="constant", constant_values=bg), 0),
                                           keys.shape[0])]
        label = fg_conf.copy()
        label[fg_conf == 0] = 255
        label[bg_conf + fg_conf == 0] = 0
        Image.fromarray(label.astype(np.uint8)).save(out / f"{image_id}.png")


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def irn_cam_network(checkpoint: Path, num_classes: int):
    """IRN's ``resnet50_cam.CAM`` as torchvision layers, with the weights of a lit_wsss ``.ckpt``."""
    import torch
    import torch.nn.functional as F
    import torchvision

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    resnet = torchvision.models.resnet50(weights=None)
    resnet.layer4[0].conv2.stride = (1, 1)  # strides (2, 2, 2, 1): output stride 16
    resnet.layer4[0].downsample[0].stride = (1, 1)
    resnet.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")},
                           strict=False)
    classifier = state["classifier.weight"]
    assert classifier.shape[0] == num_classes, classifier.shape
    stages = torch.nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1,
                                 resnet.layer2, resnet.layer3, resnet.layer4).eval()

    def cam(pair):
        x = F.relu(F.conv2d(stages(pair), classifier))
        return x[0] + x[1].flip(-1)

    return cam


class MultiScaleImages:
    """IRN's ``VOC12ClassificationDatasetMSF``: per scale, the image and its flip, ``(2, 3, h, w)`` float32."""

    def __init__(self, images: Path, ids: list[str], labels: dict, scales: tuple[float, ...]) -> None:
        self.images, self.ids, self.labels, self.scales = images, ids, labels, scales

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        name = self.ids[index]
        image = np.asarray(Image.open(self.images / f"{name}.jpg").convert("RGB"))
        height, width = image.shape[:2]
        pack = []
        for scale in self.scales:
            scaled = image if scale == 1.0 else np.asarray(Image.fromarray(image).resize(
                (int(np.round(width * scale)), int(np.round(height * scale))), resample=Image.BICUBIC))
            normalised = np.empty_like(scaled, np.float32)
            for c in range(3):
                normalised[..., c] = (scaled[..., c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            chw = np.transpose(normalised, (2, 0, 1))
            pack.append(np.ascontiguousarray(np.stack([chw, np.flip(chw, -1)], axis=0)))
        # IRN's decode_int_filename: the label dict is keyed by the id's digits as an int
        return {"name": name, "img": pack, "size": (height, width), "label": self.labels[int(name.replace("_", ""))]}


def make_cam(checkpoint: Path, images: Path, ids: list[str], labels: dict, out: Path, num_classes: int,
             scales: tuple[float, ...]) -> None:
    import os

    import torch
    import torch.nn.functional as F

    out.mkdir(parents=True, exist_ok=True)
    cam = irn_cam_network(checkpoint, num_classes)
    loader = torch.utils.data.DataLoader(MultiScaleImages(images, ids, labels, scales), shuffle=False,
                                         num_workers=max(1, (os.cpu_count() or 2) // 2), pin_memory=False)
    with torch.no_grad():
        for pack in loader:
            height, width = int(pack["size"][0][0]), int(pack["size"][1][0])
            strided_size = (-(-height // 4), -(-width // 4))
            strided_up_size = (16 * -(-height // 16), 16 * -(-width // 16))
            outputs = [cam(img[0]) for img in pack["img"]]
            strided = torch.sum(torch.stack([F.interpolate(o[None], strided_size, mode="bilinear",
                                                           align_corners=False)[0] for o in outputs]), 0)
            highres = [F.interpolate(o[:, None], strided_up_size, mode="bilinear", align_corners=False)
                       for o in outputs]
            highres = torch.sum(torch.stack(highres, 0), 0)[:, 0, :height, :width]
            valid_cat = torch.nonzero(pack["label"][0])[:, 0]
            strided = strided[valid_cat]
            strided /= F.adaptive_max_pool2d(strided, (1, 1)) + 1e-5
            highres = highres[valid_cat]
            highres /= F.adaptive_max_pool2d(highres, (1, 1)) + 1e-5
            np.save(out / f"{pack['name'][0]}.npy", {"keys": valid_cat, "cam": strided, "high_res": highres.numpy()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("eval", "ir", "cam"))
    parser.add_argument("--cams", type=Path, help="eval, ir: the official .npy CAM folder")
    parser.add_argument("--root", type=Path, required=True, help="VOC layout: JPEGImages/, SegmentationClass/")
    parser.add_argument("--ids", type=Path, required=True, help="one id per line")
    parser.add_argument("--thresholds", default="", help="eval: comma list")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--out", type=Path, help="ir, cam: output folder")
    parser.add_argument("--checkpoint", type=Path, help="cam: a lit_wsss .ckpt of a ResNet-50 CAM network")
    parser.add_argument("--scales", default="1.0,0.5,1.5,2.0", help="cam: comma list")
    args = parser.parse_args(argv)
    ids = args.ids.read_text().split()
    if args.stage == "eval":
        thresholds = [float(t) for t in args.thresholds.split(",")]
        print(json.dumps({"miou": eval_cam(args.cams, args.root / "SegmentationClass", ids, thresholds,
                                           args.num_classes)}))
    elif args.stage == "ir":
        ir_labels(args.cams, args.root / "JPEGImages", ids, args.out)
    else:
        # IRN's cls_labels.npy: a pickled {id: 20-vector} dict (the one official file lit_wsss reads with pickles)
        labels = np.load(args.root / "cls_labels.npy", allow_pickle=True).item()
        labels = {int(k): np.asarray(v, np.float32) for k, v in labels.items()}
        make_cam(args.checkpoint, args.root / "JPEGImages", ids, labels, args.out, args.num_classes,
                 tuple(float(s) for s in args.scales.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
