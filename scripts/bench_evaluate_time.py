"""Wall time of ``brainfm-evaluate`` before and after a change, interleaved on the same machine (before, after,
before, after), with the default settings and ``window_lengths=[30]``; Rank-1 / mAP must be bit-identical,
probe accuracies that differ are listed (brainfm.bench.evaluate_time). ~22 min on 2 loaded cores with the
issue-20 "before" (its default runs took 3-11 min, the "after" ones 10-30 s).

    python scripts/bench_evaluate_time.py --before <other checkout>/.venv/bin/brainfm-evaluate \\
        [--after .venv/bin/brainfm-evaluate] [--ckpt outputs/demo/demo] [--repeats 2] \\
        [--settings "" "window_lengths=[30]"]
"""

import argparse
import sys
from pathlib import Path

from brainfm.bench.evaluate_time import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the brainfm-evaluate executable of the version to compare with")
    parser.add_argument("--after", default=str(Path(sys.executable).with_name("brainfm-evaluate")),
                        help="default: the brainfm-evaluate beside this interpreter")
    parser.add_argument("--ckpt", default="outputs/demo/demo", help="a run directory or checkpoint (make demo's)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per version and setting, interleaved")
    parser.add_argument("--settings", nargs="+", default=["", "window_lengths=[30]"],
                        help="space-separated overrides per setting ('' = the defaults)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = parser.parse_args()
    sys.exit(main(args.before, args.after, args.ckpt, args.settings, args.repeats, args.timeout))
