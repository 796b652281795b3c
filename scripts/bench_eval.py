"""Subject re-identification at 100,000 and 300,000 synthetic windows (D = 288): time and peak memory
of the blockwise implementation (target: under 2 GB) vs the dense one where it fits (10,000 and
30,000 windows; predicted beyond). Each case runs in a fresh interpreter. ~10 min on 2 cores.

    python scripts/bench_eval.py [--sizes 100000 300000] [--dense-sizes 10000 30000]
        [--windows-per-subject 10] [--block-size N] [--device cpu|cuda]
"""

import argparse
import sys

from brainfm.bench.eval import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000], help="windows, blockwise only")
    parser.add_argument("--dense-sizes", type=int, nargs="*", default=[10_000, 30_000],
                        help="windows, dense and blockwise")
    parser.add_argument("--windows-per-subject", type=int, default=10, help="even: half gallery, half queries")
    parser.add_argument("--dim", type=int, default=288)
    parser.add_argument("--noise", type=float, default=1.5, help="window spread around its subject centre")
    parser.add_argument("--block-size", type=int, default=None, help="queries per block (default: 256 MiB blocks)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.exit(main(args.sizes, args.dense_sizes, args.windows_per_subject, args.dim, args.noise, args.block_size,
                  args.device, args.seed))
