"""Does a model trained by brainfm beat FC fingerprinting? Every model / readout / objective combination
(brainfm.bench.CONFIGS) trained on the embedded HCP data, re-identified on held-out second halves and
zero-shot on another site (gw, TR 2 s), Rank-1 / mAP per window, mean +- std over seeds; or the
selection protocol the demo's recipe was chosen on (first halves only).

    python scripts/bench_fingerprint.py [--protocol final|selection|both] [--configs a b ...]
        [--seeds 0 1 2] [--steps N] [--out outputs/bench_fingerprint]
"""

import argparse
import sys

from brainfm.bench.fingerprint import CONFIGS, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["final", "selection", "both"], default="final")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None, help="default: all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="selection uses the first")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the experiment's)")
    parser.add_argument("--out", default="outputs/bench_fingerprint")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    sys.exit(main(args.protocol, args.configs, args.seeds, args.out, args.steps, args.data_dir))
