"""Swin4D step times per version and size (`make bench`); with --swift-repo, side by side with the
public SwiFT ver7 code (python scripts/bench_swin4d.py --swift-repo /path/to/SwiFT)."""

from brainfm.bench.swin4d import main

if __name__ == "__main__":
    main()
