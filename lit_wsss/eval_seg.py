"""``lit-wsss eval-seg``: dataset-level mIoU of a folder of label maps (segmentation predictions, pseudo labels).

``lit-wsss eval-seg --pred DIR --root ROOT --list val --out R.json`` writes ``R.json`` and ``R.md`` (per-class
IoU, precision, recall, pixel and mean class accuracy); the scores come from
:func:`lit_wsss.evaluation.evaluate_label_folder` (one confusion matrix over every pixel, 255 ignored).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_wsss.datamodules.labels import read_class_list
from lit_wsss.evaluation import (CLASS_NAMES_HELP, MEAN_OVER, NUM_CLASSES_HELP, evaluate_label_folder, percent,
                                 write_reports)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-wsss eval-seg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="folder of <id>.png label maps (0 background, c+1 class c)")
    parser.add_argument("--root", required=True, help="VOC-layout root with SegmentationClass[Aug]/")
    parser.add_argument("--list", required=True, help="split list: a path, or a name under the root")
    parser.add_argument("--out", required=True, help="result JSON; the .md report is written beside it")
    parser.add_argument("--num-classes", type=int, help=NUM_CLASSES_HELP)
    parser.add_argument("--class-names", help=CLASS_NAMES_HELP)
    parser.add_argument("--mask-dir", help="ground-truth folder (default <root>/SegmentationClass, else ...Aug)")
    parser.add_argument("--mean-over", choices=list(MEAN_OVER), default="union",
                        help="classes the mIoU averages over (default union; both are in the JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def eval_seg(pred: str | Path, root: str | Path, list_name: str, out: str | Path, num_classes: int | None = None,
             class_names: str | None = None, mask_dir: str | None = None, mean_over: str = "union",
             progress: bool = True) -> dict:
    """What ``lit-wsss eval-seg`` runs: :func:`lit_wsss.evaluation.evaluate_label_folder` over the ids of a split
    list, reports written next to ``out``. Returns the result with ``reports`` (the paths)."""
    from lit_wsss.datamodules.files import read_id_list, resolve_list

    root = Path(root)
    ids = read_id_list(resolve_list(root, list_name))
    names = read_class_list(class_names) if class_names else None
    result = evaluate_label_folder(pred, root, ids, num_classes, mask_dir, class_names=names, progress=progress,
                                   mean_over=mean_over)
    paths = write_reports(result, out)
    return {**result, "reports": {kind: None if path is None else str(path) for kind, path in paths.items()}}


def main(argv: list[str] | None = None) -> int:
    """Returns 0 on success, 1 when a file is missing or malformed (the message names it)."""
    args = build_parser().parse_args(argv)
    try:
        result = eval_seg(args.pred, args.root, args.list, args.out, args.num_classes, args.class_names,
                          args.mask_dir, args.mean_over, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        print(f"eval-seg: error: {error}", file=sys.stderr)
        return 1
    print(f"mIoU {percent(result['miou'])} % on {result['num_images']} images (over the {MEAN_OVER[args.mean_over]}); "
          f"pixel accuracy {percent(result['pixel_accuracy'])} %, mean class accuracy "
          f"{percent(result['mean_class_accuracy'])} %")
    print("reports: " + ", ".join(p for p in result["reports"].values() if p is not None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
