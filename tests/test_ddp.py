"""DDP: validation mIoU reduces confusion matrices across ranks (style.md P6; ../shared/stack.md §3b).

Runs 2 CPU processes with ``ddp_spawn`` (``ddp`` would re-run pytest itself in the second rank).
"""

import pytest
import pytorch_lightning as pl
import torch

from lit_wsss.cams import cams_to_mask
from lit_wsss.datamodules import SyntheticVOCDataModule
from lit_wsss.errors import NonFiniteError
from lit_wsss.metrics import miou_from_confusion
from lit_wsss.modules import CAM

NUM_CLASSES = 3


def make_datamodule(root):
    # 5 validation images: an odd count, so 2 ranks get 3 + 2 and nothing may be padded or repeated
    return SyntheticVOCDataModule(
        root=str(root), num_classes=NUM_CLASSES, num_train=4, num_val=5, image_size=(64, 80), context_class=0, generator_seed=1,
        num_workers=0,
    )


def trainer(devices: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )


def reference_miou(model, datamodule) -> float:
    """Straightforward single-process evaluation: one confusion matrix over all images."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    confusion = torch.zeros(NUM_CLASSES + 1, NUM_CLASSES + 1, dtype=torch.long)
    model.eval()
    for sample in datamodule.val_dataset:
        record = model.infer_cams(sample["image"], sample["labels"])
        prediction = cams_to_mask(record["high_res"], record["keys"], model.hparams.cam_bg_threshold)
        valid = sample["mask"] != 255
        confusion += torch.bincount(
            sample["mask"][valid] * (NUM_CLASSES + 1) + prediction[valid], minlength=(NUM_CLASSES + 1) ** 2
        ).view(NUM_CLASSES + 1, NUM_CLASSES + 1)
    return miou_from_confusion(confusion).item()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_two_process_validation_equals_one_process(tmp_path):
    torch.manual_seed(0)
    model = CAM(num_classes=NUM_CLASSES, backbone="resnet18", pretrained=None, cam_scales=(1.0, 0.5),
                cam_bg_threshold=0.5)
    datamodule = make_datamodule(tmp_path / "synthetic")
    expected = reference_miou(model, make_datamodule(tmp_path / "synthetic"))
    single = trainer(1).validate(model, datamodule)[0]
    try:
        double = trainer(2).validate(model, make_datamodule(tmp_path / "synthetic"))[0]
    except torch.multiprocessing.ProcessExitedException as error:
        # Seen once in ~5 fresh-clone runs: a rank aborted at interpreter exit ("terminate called without an
        # active exception", gloo teardown) after its metrics were reduced. Only that exit is retried, once.
        if "SIGABRT" not in str(error):
            raise
        double = trainer(2).validate(model, make_datamodule(tmp_path / "synthetic"))[0]
    assert 0 < expected < 1
    assert single["val/mIoU"] == pytest.approx(expected, abs=1e-6)
    assert double["val/mIoU"] == pytest.approx(expected, abs=1e-6)
    # the threshold sweep is reduced across ranks too (0.5, the fixed threshold, is one of its planes)
    assert double["val/mIoU_oracle"] == pytest.approx(single["val/mIoU_oracle"], abs=1e-9)
    assert double["val/threshold_oracle"] == single["val/threshold_oracle"]
    assert single["val/mIoU_oracle"] >= single["val/mIoU"] - 1e-9


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_two_process_training_has_no_unused_parameters_and_keeps_frozen_levels(tmp_path):
    """find_unused_parameters stays off: frozen levels must be out of DDP's sight, not merely gradient-free."""
    torch.manual_seed(0)
    model = CAM(num_classes=NUM_CLASSES, backbone="resnet18", pretrained=None, cam_scales=(1.0,))
    frozen_before = model.backbone.layer2[0].conv1.weight.detach().clone()
    trained_before = model.backbone.layer4[0].conv1.weight.detach().clone()
    datamodule = make_datamodule(tmp_path / "synthetic")
    datamodule.batch_size = 2
    run = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )
    run.fit(model, datamodule)
    # ddp_spawn copies the trained weights back into this process's model
    assert torch.equal(model.backbone.layer2[0].conv1.weight, frozen_before)
    assert not torch.equal(model.backbone.layer4[0].conv1.weight, trained_before)


def _method_model(name: str, tmp_path):
    """A small model of each method whose training touches parameters differently, and its data transform."""
    from lit_wsss.modules import CPN, SIPE, VWE, SemanticEncoder, SLAMs

    common = {"num_classes": NUM_CLASSES, "backbone": "resnet18", "pretrained": None, "cam_scales": (1.0,)}
    if name == "sipe":
        return SIPE(**common), "irn_cls_valid"
    if name == "cpn":
        return CPN(**common), "cpn_grid"
    if name == "vwe_memory_bank":
        return VWE(**common, strategy="memory_bank", frozen_levels=1, num_words=8), "irn_cls"
    encoder = SemanticEncoder(num_classes=NUM_CLASSES, backbone="resnet18", pretrained=None, embed_dim=8, se_size=32)
    path = tmp_path / "encoder.ckpt"
    torch.save({"state_dict": encoder.state_dict()}, path)
    return SLAMs(**common, encoder_checkpoint=str(path), encoder_backbone="resnet18", embed_dim=8, se_size=32), \
        "irn_cls_valid"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["sipe", "cpn", "vwe_memory_bank", "slams"])
def test_two_process_training_of_each_method(name, tmp_path):
    """Every method trains under 2-process DDP without find_unused_parameters: no parameter DDP can see is
    left without a gradient (side convs, CPN heads, VWE's unused W_a, SLAMs' frozen encoder)."""
    torch.manual_seed(0)
    model, transform = _method_model(name, tmp_path)
    datamodule = make_datamodule(tmp_path / "synthetic")
    datamodule.batch_size, datamodule.train_transform, datamodule.crop_size = 2, transform, 64
    before = model.backbone.layer4[0].conv1.weight.detach().clone()
    pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, limit_val_batches=0, logger=False,
               enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False).fit(model, datamodule)
    assert not torch.equal(model.backbone.layer4[0].conv1.weight, before)


class NanOnRankOne(CAM):
    """A loss that goes nan on rank 1 only, at step 1 (module level: ddp_spawn pickles the model)."""

    def training_losses(self, batch):
        losses = super().training_losses(batch)
        if self.global_rank == 1 and self.global_step == 1:
            losses["cls"] = losses["cls"] * float("nan")
        return losses

    def stop_on_non_finite(self, losses, batch_idx):
        try:
            super().stop_on_non_finite(losses, batch_idx)
        except NonFiniteError as error:  # what each rank saw, for the test to read
            (self.record_dir / f"rank{self.global_rank}.txt").write_text(str(error))
            raise


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_a_nan_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    """Issue 17 under DDP: the flag is all-reduced, so rank 0 stops too instead of waiting for rank 1 in the
    gradient all-reduce; the error names the step."""
    torch.manual_seed(0)
    model = NanOnRankOne(num_classes=NUM_CLASSES, backbone="resnet18", pretrained=None, cam_scales=(1.0,))
    model.record_dir = tmp_path
    datamodule = make_datamodule(tmp_path / "synthetic")
    datamodule.batch_size = 1
    run = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, limit_val_batches=0,
                     logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(Exception, match=r"non-finite training loss at step 1 \(epoch 0, batch 1\) on (rank 1: cls=nan|"
                                        r"another rank)"):
        run.fit(model, datamodule)
    assert (tmp_path / "rank1.txt").read_text().startswith("non-finite training loss at step 1 (epoch 0, batch 1) "
                                                         "on rank 1: cls=nan")
    assert (tmp_path / "rank0.txt").read_text().startswith("non-finite training loss at step 1 (epoch 0, batch 1) "
                                                         "on another rank")
