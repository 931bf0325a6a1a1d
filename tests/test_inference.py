"""CPU inference speed (lit_wsss.inference, issue 18): the frozen backbone graph computes what the eager one does,
refuses a graph that baked in its tracing size, and the allocator setting keeps freed memory."""

import json
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lit_wsss.backbones import build_backbone
from lit_wsss.callbacks import CAMWriter
from lit_wsss.cam_files import read_cam_file
from lit_wsss.inference import frozen_forward, use_eager_backbone, use_frozen_backbone
from lit_wsss.modules import CAM

from test_writers import make_datamodule


class PadsToItsInputSize(nn.Module):
    """A 'same'-padding layer computed from Python ints of the input shape: a trace keeps the tracing size's pad."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        return [self.conv(F.pad(x, [0, width % 2 + 1, 0, height % 2 + 1]))]


def test_frozen_resnet_equals_eager_on_an_unseen_size():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", pretrained=None).eval()
    forward, how = frozen_forward(backbone)
    assert forward is not None, how
    image = torch.randn(2, 3, 75, 109)  # neither the tracing size nor a probe size
    with torch.no_grad():
        expected, got = backbone(image), forward(image)
    assert [t.shape for t in got] == [t.shape for t in expected]
    for want, have in zip(expected, got, strict=True):
        assert float((want - have).abs().max()) <= 1e-4 * float(want.abs().max())


def test_a_graph_that_baked_in_its_tracing_size_is_refused():
    forward, how = frozen_forward(PadsToItsInputSize())
    assert forward is None
    assert how.startswith("eager") and "shape" in how


def test_the_frozen_backbone_is_undone_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    model = CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0,)).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    assert use_frozen_backbone(model).startswith("frozen graph")
    assert "forward" in model.backbone.__dict__
    use_eager_backbone(model)
    assert "forward" not in model.backbone.__dict__
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_frozen_export_writes_the_eager_cams_up_to_rounding(tmp_path):
    folders = {}
    for frozen in (False, True):
        torch.manual_seed(0)
        model = CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0, 0.5))
        folders[frozen] = tmp_path / f"cams_{frozen}"
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             callbacks=[CAMWriter(str(folders[frozen]), frozen_backbone=frozen)])
        trainer.predict(model, make_datamodule(tmp_path / "synthetic"), return_predictions=False)
        assert "forward" not in model.backbone.__dict__  # eager again after predict
    manifests = {f: json.loads((folders[f] / "manifest.json").read_text()) for f in folders}
    assert manifests[True]["backbone_forward"].startswith("frozen graph")
    assert manifests[False]["backbone_forward"] == "eager"
    ids = sorted(manifests[True]["images"])
    assert ids == sorted(manifests[False]["images"]) and len(ids) == 5
    for image_id in ids:
        eager, frozen = (read_cam_file(folders[f] / f"{image_id}.npz", ("keys", "high_res", "cam")) for f in (0, 1))
        np.testing.assert_array_equal(eager["keys"], frozen["keys"])
        for name in ("high_res", "cam"):  # max-normalised maps in [0, 1]: absolute rounding differences
            np.testing.assert_allclose(frozen[name], eager[name], rtol=0, atol=1e-4)


def test_keep_freed_memory_is_accepted_by_glibc():
    """mallopt accepts every setting (its effect, fewer page faults and a faster export, is measured in
    benchmarks/speed_vs_official.py --cam-ablation); in a child process, so this one keeps glibc's defaults."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    result = subprocess.run([sys.executable, "-c", "from lit_wsss.inference import keep_freed_memory as k; "
                             "print(k())"], check=True, capture_output=True, text=True)
    assert result.stdout.split()[-1] == "True"
