"""Print clips/s of the volume store vs the per-frame .pt layout (SwiFT/TFF/R2T), warm and cold,
beside a memory copy and dd of the same bytes. Writes ~2.8 GB of synthetic 96^3 data to a temporary
folder (removed afterwards; --data-dir keeps/reuses it). Run as root for the cold rows (drop_caches).

    python scripts/bench_volume_loader.py [--runs 2] [--frames 400] [--batch 4] [--data-dir DIR]
"""

import argparse
from pathlib import Path

from brainfm.bench.volume_loader import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--frames", type=int, default=400, help="TRs per run")
    parser.add_argument("--batch", type=int, default=4, help="clips per batch")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the synthetic data here (reused if present)")
    args = parser.parse_args()
    main(args.data_dir, args.runs, args.frames, args.batch)
