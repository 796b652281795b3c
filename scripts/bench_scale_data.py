"""The data layer at UK Biobank scale: store open time and metadata operations, time to the first
optimizer step, DataLoader worker memory over 100,000 clips (5,000 vs 45,000 runs), data=multi over
60,000 runs, parcellation runs/minute. Writes synthetic stores (sparse by default: little disk) to a
temporary folder, removed afterwards unless --work is given (then reused). ~15-25 min on 2 cores.

    python scripts/bench_scale_data.py [--work DIR] [--data zeros|random] [--clips 100000]
        [--skip train rss parcellation] [--shrink 100]
"""

import argparse
from pathlib import Path

from brainfm.bench.scale_data import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="keep the stores here (reused when present)")
    parser.add_argument("--data", choices=["zeros", "random"], default="zeros",
                        help="zeros: sparse bold.npy files (45,000 runs of 490 TRs at 8^3 are 22 GB as random data)")
    parser.add_argument("--clips", type=int, default=100_000, help="clips a DataLoader worker reads")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "rss", "parcellation"])
    parser.add_argument("--shrink", type=int, default=1, help="divide every store's run count (quick check)")
    args = parser.parse_args()
    main(args.work, args.data, args.clips, tuple(args.skip), args.shrink)
