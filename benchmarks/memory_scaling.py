"""Does daaa's memory grow with the data set? (issue 15)

Builds two folder pairs of one kind -- 64 px RGB colour patches, 10 classes; ``--small`` and ``--big`` images per
training domain (source, target) and a fifth of that for target-test -- then runs the same command on each::

    daaa run --source S --target T --target-test TT --preset smoke --set data.load_size=64 --set data.image_size=64
             --set data.cache_bytes=CACHE

and samples, every 0.2 s, the memory the system cannot reclaim: RssAnon + RssShmem from /proc/PID/status summed over
the whole process tree (ranks and DataLoader workers included). Prints both peaks, their ratio (the goal: <= 1.3
for 10x the images) and the times; with ``--json FILE`` also writes them.

Note on the measure: a forked DataLoader worker maps its parent's anonymous pages copy-on-write, and RssAnon counts
them again in every worker, so the sum over the tree counts the main process's anonymous memory once per worker as
well. That is the same for both pairs (it does not change the ratio); the proportional figure (Pss_Anon + Pss_Shmem
from /proc/PID/smaps_rollup, shared pages split among the processes that map them) is printed beside it.

    python3 benchmarks/memory_scaling.py DIR                        # 3,000 and 30,000 images (the issue's figures)
    python3 benchmarks/memory_scaling.py DIR --small 300 --big 3000  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 64, 10


# ---------------------------------------------------------------------------------------------- the folder pairs
def _patch(rng: np.random.Generator, label: int, target: bool) -> np.ndarray:
    """A 64 px image of class ``label``: a bright block whose place says the class, on a background that is dark
    (source) or a random colour gradient (target)."""
    if target:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0.0, 1.0, SIZE)[None, :, None]
        img = (a * (1 - t) + b * t).repeat(SIZE, axis=0)
    else:
        img = np.full((SIZE, SIZE, 3), rng.integers(0, 40), dtype=np.float64)
    row, col = divmod(label, 5)
    y, x = 6 + row * 28 + rng.integers(0, 6), 2 + col * 12 + rng.integers(0, 3)
    img[y:y + 20, x:x + 9] = rng.integers(160, 256, 3)
    return img.clip(0, 255).astype(np.uint8)


def write_domain(root: Path, n: int, target: bool, seed: int) -> None:
    """``n`` PNG files in ``root/<class>/`` (done once: a finished folder holds ``.complete``)."""
    if (root / ".complete").is_file():
        return
    rng = np.random.default_rng(seed)
    for k in range(CLASSES):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % CLASSES
        Image.fromarray(_patch(rng, label, target)).save(root / f"c{label}" / f"{i:06d}.png", compress_level=1)
    (root / ".complete").write_text(str(n))


def make_pair(folder: Path, n: int) -> dict[str, Path]:
    """Source, target and target-test folders of ``n``, ``n`` and ``n // 5`` images."""
    roles = {"source": (n, False, 1), "target": (n, True, 2), "target-test": (max(CLASSES, n // 5), True, 3)}
    out = {}
    for role, (count, target, seed) in roles.items():
        out[role] = folder / role
        write_domain(out[role], count, target, seed + n)
    return out


# ---------------------------------------------------------------------------------------------- measuring
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("RssAnon", "RssShmem"):
                    out[key] = int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("Pss_Anon", "Pss_Shmem"):
                    out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError):  # the process ended meanwhile
        pass
    return out


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (ranks, DataLoader workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def measure(cmd: list[str], log: Path, interval: float = 0.2) -> dict[str, float]:
    """Run ``cmd``; the peaks over its process tree of RssAnon + RssShmem and of Pss_Anon + Pss_Shmem (MiB), the
    most processes seen at once, and the seconds it took."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        peak_rss = peak_pss = 0
        procs = 0
        while p.poll() is None:
            stats = [_status(pid) for pid in _tree(p.pid)]
            peak_rss = max(peak_rss, sum(s.get("RssAnon", 0) + s.get("RssShmem", 0) for s in stats))
            peak_pss = max(peak_pss, sum(s.get("Pss_Anon", 0) + s.get("Pss_Shmem", 0) for s in stats))
            procs = max(procs, len(stats))
            time.sleep(interval)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {p.returncode}); see {log}")
    return {"peak_rss_anon_shmem_mib": peak_rss / 2 ** 20, "peak_pss_anon_shmem_mib": peak_pss / 2 ** 20,
            "max_processes": procs, "seconds": time.perf_counter() - t0}


def run_command(pair: dict[str, Path], out: Path, cache_bytes: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "daaa", "run", "--source", str(pair["source"]), "--target", str(pair["target"]),
            "--target-test", str(pair["target-test"]), "--out", str(out), "--overwrite", "--quiet",
            "--preset", "smoke", "--set", f"data.load_size={SIZE}", "--set", f"data.image_size={SIZE}",
            "--set", f"data.cache_bytes={cache_bytes}", *extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="where the folder pairs and run folders go (pairs are reused)")
    ap.add_argument("--small", type=int, default=3000, help="images per training domain of the small pair")
    ap.add_argument("--big", type=int, default=30000, help="images per training domain of the big pair")
    ap.add_argument("--cache-bytes", type=int, default=16 * 2 ** 20,
                    help="data.cache_bytes of both runs (default 16 MiB: the big pair streams)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for both runs")
    args = ap.parse_args()
    extra = [x for kv in args.set for x in ("--set", kv)]
    rows = {}
    for n in (args.small, args.big):
        t = time.perf_counter()
        pair = make_pair(args.dir / f"pair-{n}", n)
        print(f"pair of {n} images per training domain: {time.perf_counter() - t:.0f} s to write", flush=True)
        cmd = run_command(pair, args.dir / f"run-{n}", args.cache_bytes, extra)
        rows[n] = measure(cmd, args.dir / f"run-{n}.log")
        r = rows[n]
        print(f"  peak RssAnon+RssShmem {r['peak_rss_anon_shmem_mib']:.0f} MiB (PSS {r['peak_pss_anon_shmem_mib']:.0f}"
              f" MiB, up to {r['max_processes']} processes), {r['seconds']:.0f} s", flush=True)
    small, big = rows[args.small], rows[args.big]
    ratio = big["peak_rss_anon_shmem_mib"] / small["peak_rss_anon_shmem_mib"]
    print(f"\n{'images':>8} {'RssAnon+RssShmem MiB':>21} {'PSS MiB':>8} {'seconds':>8}")
    for n, r in rows.items():
        print(f"{n:>8} {r['peak_rss_anon_shmem_mib']:>21.0f} {r['peak_pss_anon_shmem_mib']:>8.0f} {r['seconds']:>8.0f}")
    print(f"ratio big/small: {ratio:.2f} (goal <= 1.3); PSS ratio "
          f"{big['peak_pss_anon_shmem_mib'] / small['peak_pss_anon_shmem_mib']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cache_bytes": args.cache_bytes, "overrides": args.set,
                                         "runs": {str(n): r for n, r in rows.items()}, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
