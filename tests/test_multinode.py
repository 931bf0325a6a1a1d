"""2 nodes x 1 process on loopback through torchrun: the multi-node launch path trains (issue 3)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lit_wsss.datamodules.synthetic import generate_synthetic_voc
from lit_wsss.stages import configs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_one_process_each_train_a_few_steps(tmp_path):
    data = generate_synthetic_voc(tmp_path / "synthetic", num_train=16, num_val=2, seed=5)
    port = free_port()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    nodes = []
    for node_rank in range(2):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
            "-m", "lit_wsss", "fit",
            *configs("synth", "cam"),
            "--config", str(EXPERIMENTS / "trainer" / "ddp_multinode.yaml"),
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=2",
            f"--data.init_args.root={data}", "--data.init_args.num_train=16", "--data.init_args.num_val=2",
            "--data.init_args.generator_seed=5", "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0", "--data.init_args.crop_size=64",
            "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=null",
            "--model.init_args.cam_scales=[1.0]",
            "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
        ]
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, cwd=tmp_path))
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["protocol"]["world_size"] == 2
    assert checkpoint["protocol"]["effective_batch_size"] == 4  # 2 per process x 2 nodes
