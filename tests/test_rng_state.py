"""RNGState: a fit resumed from an end-of-epoch checkpoint sees the batches, augmentations and dropout
masks of the uninterrupted fit, in process (num_workers=0) and in workers; without it, epoch 0 is replayed."""

import albumentations as A
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from lit_wsss.callbacks.rng_state import RNGState
from lit_wsss.datamodules.base import WSSSDataModule


class ToyDataset(Dataset):
    """16 fixed 12 x 12 images, randomly flipped and cropped to 8 x 8 by an albumentations pipeline."""

    def __init__(self) -> None:
        self.images = np.random.default_rng(1).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
        self.transform = A.Compose([A.HorizontalFlip(p=0.5), A.RandomCrop(8, 8), ToTensorV2()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.transform(image=self.images[index])["image"].float() / 255
        return {"image": image, "labels": torch.tensor([index % 2, 1 - index % 2], dtype=torch.float32),
                "image_id": str(index), "size": torch.tensor(image.shape[-2:])}


class ToyData(WSSSDataModule):
    """The real loaders of WSSSDataModule (shuffling, transform reseeding, seed_worker) on the toy set."""

    num_classes = 2
    class_names = ("a", "b")
    val_dataloader = None  # training only (Lightning warns about a val loader without validation_step)

    def setup(self, stage: str) -> None:
        self.train_dataset = ToyDataset()


class ToyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(3 * 8 * 8, 2))
        self.seen: list[tuple[int, list[str], float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, list(batch["image_id"]), batch["image"].sum().item()))
        return F.binary_cross_entropy_with_logits(self.net(batch["image"].flatten(1)), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(root, workers: int, callback: bool, ckpt_path=None) -> ToyModel:
    pl.seed_everything(0)  # a new process seeds again
    model = ToyModel()
    callbacks = [ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)]
    callbacks += [RNGState()] if callback else []
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         default_root_dir=root, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, ToyData(batch_size=4, num_workers=workers), ckpt_path=ckpt_path)
    return model


def epoch(model: ToyModel, index: int) -> list:
    return [step[1:] for step in model.seen if step[0] == index]


@pytest.mark.filterwarnings("ignore:The dirpath has changed", "ignore:Be aware that when using `ckpt_path`",
                            "ignore:The 'train_dataloader' does not have many workers")
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_epoch_end_matches_uninterrupted(tmp_path, workers):
    full = fit(tmp_path / "full", workers, callback=True)
    checkpoint = tmp_path / "full" / "epoch=0.ckpt"
    assert epoch(full, 0) != epoch(full, 1)

    resumed = fit(tmp_path / "resumed", workers, callback=True, ckpt_path=checkpoint)
    assert epoch(resumed, 1) == epoch(full, 1)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key

    # without the callback the resumed process draws from freshly seeded RNGs: epoch 0 again
    plain = fit(tmp_path / "plain", workers, callback=False, ckpt_path=checkpoint)
    assert epoch(plain, 1) == epoch(full, 0)
    assert not torch.equal(plain.net[1].weight, full.net[1].weight)
