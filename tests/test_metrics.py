"""Confusion matrix and mIoU on a hand-worked example (protocol.md §5, §11 item 4)."""

import math

import torch

from lit_wsss.metrics import MeanIoU, iou_from_confusion, miou_from_confusion


def test_hand_example_with_ignore_pixels():
    # ground truth / prediction, 255 = ignore (its prediction, 2, must not count anywhere)
    target = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    preds = torch.tensor([[[0, 1, 1], [1, 2, 2]]])
    metric = MeanIoU(num_classes=3)
    metric.update(preds, target)
    # counted pairs (g, p): (0,0) (0,1) (1,1) (1,1) (2,2)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    assert torch.equal(metric.confmat, expected)
    # IoU_0 = 1 / (2 + 1 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 1 / (1 + 1 - 1)
    assert torch.allclose(metric.iou(), torch.tensor([0.5, 2 / 3, 1.0], dtype=torch.float64))
    assert math.isclose(metric.compute().item(), (0.5 + 2 / 3 + 1.0) / 3)


def test_absent_class_is_skipped_not_zero():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 in neither gt nor prediction
    iou = iou_from_confusion(confusion)
    assert torch.isnan(iou[2])
    assert math.isclose(miou_from_confusion(confusion).item(), (3 / 4 + 2 / 3) / 2)


def test_perfect_prediction_and_ignore_do_not_change_counts():
    target = torch.randint(0, 4, (2, 8, 8))
    metric = MeanIoU(num_classes=4)
    metric.update(target.clone(), target)
    assert metric.compute().item() == 1.0
    counts = metric.confmat.clone()
    ignored = torch.full_like(target, 255)
    metric.update(torch.randint(0, 4, (2, 8, 8)), ignored)
    assert torch.equal(metric.confmat, counts)


def test_accumulates_over_images_not_mean_of_images():
    metric = MeanIoU(num_classes=2)
    metric.update(torch.tensor([[[1, 1, 1, 1]]]), torch.tensor([[[1, 1, 1, 1]]]))  # image A: perfect
    metric.update(torch.tensor([[[1, 0]]]), torch.tensor([[[0, 0]]]))  # image B
    # dataset confusion: g0->p0 1, g0->p1 1, g1->p1 4: IoU0 = 1/2, IoU1 = 4/5
    assert math.isclose(metric.compute().item(), (1 / 2 + 4 / 5) / 2)
