"""Speed and peak memory of IRN's random walk: sparse 256-step walk vs the official dense squaring.

For typical VOC image sizes W x H (160x120, 256x256, 320x240, 400x300, 500x375, 512x512; stride-4 maps
``ceil(H/4) x ceil(W/4)``, e.g. 500x375 -> 94x125, N = 11750), ``K`` random CAM channels and a random
boundary map (uniform in [0, 1), fixed seed), times one call of ``lit_wsss.refine.random_walk.random_walk``
(building the transition matrix + the walk, beta 10, exp_times 8, radius 5, float32) per method, and prints
a markdown table. The dense method is skipped above ``--max-dense-n`` pixels (default 8000: it costs
``8 * 2 N^3`` flops -- 70 Tflop at N = 16384 -- and 1 GB per N x N float32 copy at that size).

Denormals: the dense squaring drives far-away transition weights below 1.2e-38 (float32 denormals), which
x86 CPUs multiply 10-50x slower (GPUs, where IRN ran it, do not care). ``torch.set_flush_denormal`` only
reaches the calling thread, so the dense walk runs with 1 thread and flush-to-zero (results change by
< 1e-38 per operation; one GEMM thread was about as fast as two on this shared machine). For maps with
``N <= --max-denormal-n`` (default 1500) it is also timed without the flush (1 thread) to show the penalty.

Threads: the sparse walk is 256 short sparse products; with 2 OpenMP threads on 2 cores that other jobs
also use, each product waits for a descheduled thread and the walk can be 10x slower than with one
thread. It is timed with 1 thread and with ``--threads`` threads (no flush: it does not need it).

Memory method: every (size, method) runs in a fresh Python subprocess; after creating the inputs and a
small warm-up walk, the process resets its peak RSS (``echo 5 > /proc/self/clear_refs``, Linux) and
records its current RSS; "peak MB" is ``VmHWM - VmRSS_before`` read from ``/proc/self/status`` after the
timed calls, i.e. the extra resident memory of the walk (torch CPU tensors are invisible to tracemalloc).
The parent also checks that the sparse and dense results agree (max |diff| / max, and the number of
pixels whose ``walk_to_labels`` label differs).

    .venv/bin/python benchmarks/random_walk_speed.py [--sizes 320x240,500x375] [--classes 2] \
        [--max-dense-n 8000] [--max-denormal-n 1500] [--repeats 3] [--threads 2] [--seed 0]

Not a test: a few minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SIZES = "160x120,256x256,320x240,400x300,500x375,512x512"  # image W x H


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(height: int, width: int, method: str, args: argparse.Namespace) -> None:
    """One (size, method) in this fresh process: prints {"times": [...], "peak_mb": ...} as JSON."""
    import torch

    from lit_wsss.refine.random_walk import random_walk

    torch.set_num_threads(args.threads)
    if args.ftz:
        torch.set_flush_denormal(True)
    generator = torch.Generator().manual_seed(args.seed)
    boundary = torch.rand(height, width, generator=generator)
    cams = torch.rand(args.classes, height, width, generator=generator)
    random_walk(cams[:, :12, :12], boundary[:12, :12], method=method)  # warm-up (kernels, lazy init)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before_kb = _status_kb("VmRSS")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        walked = random_walk(cams, boundary, method=method)
        times.append(time.perf_counter() - start)
    peak_kb = _status_kb("VmHWM")
    torch.save(walked, args.out)
    print(json.dumps({"times": times, "peak_mb": (peak_kb - before_kb) / 1024}))


def run_worker(
    args: argparse.Namespace, height: int, width: int, method: str, out: str, threads: int, ftz: bool
) -> dict:
    repeats = args.repeats if method == "sparse" else 1
    command = [sys.executable, __file__, "--worker", f"{height}x{width}", method, "--out", out]
    command += ["--classes", str(args.classes), "--repeats", str(repeats), "--seed", str(args.seed)]
    command += ["--threads", str(threads)] + (["--ftz"] if ftz else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated image sizes WxH")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--max-dense-n", type=int, default=8000, help="skip the dense method above this N")
    parser.add_argument(
        "--max-denormal-n", type=int, default=1500, help="also time dense without flush-to-zero up to this N"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of the sparse method (dense: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=2, metavar=("HxW", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--ftz", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        height, width = (int(v) for v in args.worker[0].split("x"))
        worker(height, width, args.worker[1], args)
        return

    import torch

    from lit_wsss.refine.random_walk import walk_to_labels

    load_start = os.getloadavg()[0]  # other jobs on the same cores distort the multi-thread column

    print(
        f"torch {torch.__version__}, {platform.machine()} {os.cpu_count()} CPUs, K = {args.classes}, "
        f"beta 10, exp_times 8 (256 steps), radius 5, float32; sparse: median of {args.repeats} calls; "
        f"dense: 1 call, 1 thread + flush-to-zero; peak MB = extra peak RSS of the call (1-thread runs)\n"
    )
    header = [
        "image WxH",
        "map hxw",
        "N",
        "sparse s/img (1 thr)",
        f"sparse s/img ({args.threads} thr)",
        "sparse peak MB",
        "dense s/img",
        "dense peak MB",
        "dense s/img without flush",
        "max abs diff / max",
        "labels differing",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    keys = torch.arange(args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            image_w, image_h = (int(v) for v in size.split("x"))
            height, width = math.ceil(image_h / 4), math.ceil(image_w / 4)
            n = height * width
            sparse = run_worker(args, height, width, "sparse", f"{tmp}/sparse.pt", 1, False)
            sparse_mt = run_worker(args, height, width, "sparse", f"{tmp}/sparse_mt.pt", args.threads, False)
            row = [size, f"{height}x{width}", str(n), f"{statistics.median(sparse['times']):.3f}"]
            row += [f"{statistics.median(sparse_mt['times']):.3f}", f"{sparse['peak_mb']:.0f}"]
            if n <= args.max_dense_n:
                dense = run_worker(args, height, width, "dense", f"{tmp}/dense.pt", 1, True)
                a, b = torch.load(f"{tmp}/sparse.pt"), torch.load(f"{tmp}/dense.pt")
                rel = float((a - b).abs().max() / b.abs().max())
                la = walk_to_labels(a, keys, image_h, image_w)
                lb = walk_to_labels(b, keys, image_h, image_w)
                row += [f"{dense['times'][0]:.2f}", f"{dense['peak_mb']:.0f}"]
                if n <= args.max_denormal_n:
                    slow = run_worker(args, height, width, "dense", f"{tmp}/slow.pt", 1, False)
                    row.append(f"{slow['times'][0]:.2f}")
                else:
                    row.append("-")
                row += [f"{rel:.1e}", f"{int((la != lb).sum())} / {la.numel()}"]
            else:
                row += [f"skipped (N > {args.max_dense_n})", "-", "-", "-", "-"]
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nload average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
