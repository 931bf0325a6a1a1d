"""IR labels streamed from the CAM export (``CAMWriter(ir_labels=...)``) against the two-step path (``lit-wsss
predict`` into a CAM folder, then ``lit-wsss ir-labels`` over it), each a whole process, on the first ``--images``
voc12-bench images from one ResNet-50 CAM checkpoint (``speed_vs_official.cam_checkpoint``: random init, speed
does not depend on the weights). The label maps of both paths must be identical; prints one table.

    .venv/bin/python benchmarks/stream_ir_labels.py [--shared-data ../shared/data] [--images 40]
        [--stream-workers 1] [--tool-workers 2]

Not a test: about three minutes on a 2-core CPU; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from speed_vs_official import OURS, cam_checkpoint, cam_export_command, timed_process  # noqa: E402

from lit_wsss.datamodules.files import read_id_list  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--stream-workers", type=int, default=1, help="CRF processes beside the export")
    parser.add_argument("--tool-workers", type=int, default=2, help="lit-wsss ir-labels --workers")
    args = parser.parse_args(argv)
    bench = args.shared_data / "voc12-bench"
    ids = read_id_list(bench / "ImageSets" / "Segmentation" / "train.txt")[: args.images]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stream_ir_labels_") as folder:
        work = Path(folder)
        id_file = work / "ids.txt"
        id_file.write_text("\n".join(ids) + "\n")
        checkpoint = cam_checkpoint(bench, work)
        export_s, _ = timed_process(cam_export_command(bench, checkpoint, id_file, work / "cams"), 1)
        tool_s, _ = timed_process([*OURS, "ir-labels", "--cams", str(work / "cams"), "--root", str(bench), "--list",
                                   str(id_file), "--out", str(work / "ir_tool"), "--workers",
                                   str(args.tool_workers), "--no-progress"], 1)
        stream = {"out_dir": str(work / "ir_stream"), "workers": args.stream_workers}
        stream_arg = f"--trainer.callbacks.init_args.ir_labels={json.dumps(stream)}"
        stream_s, _ = timed_process(cam_export_command(bench, checkpoint, id_file, work / "cams_stream", stream_arg), 1)
        identical = all(np.array_equal(np.array(Image.open(work / "ir_tool" / f"{i}.png")),
                                       np.array(Image.open(work / "ir_stream" / f"{i}.png"))) for i in ids)
    print(f"{os.cpu_count()} CPUs; load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"{len(ids)} voc12-bench images, ResNet-50, 4 scales + flips\n")
    print("| path | s (whole processes) | ratio |")
    print("|---|---:|---:|")
    two_step = export_s + tool_s
    print(f"| predict ({export_s:.1f} s), then ir-labels --workers {args.tool_workers} ({tool_s:.1f} s) | "
          f"{two_step:.1f} | 1.00x |")
    print(f"| predict with ir_labels streamed, {args.stream_workers} CRF worker(s) | {stream_s:.1f} | "
          f"{two_step / stream_s:.2f}x |")
    print(f"\nlabel maps identical: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
