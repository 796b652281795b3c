"""Cross-check of brainfm-scale's simulated step memory against the resident set size: the first
fp32 training step of each size in a fresh process (RSS peak above the RSS before the step) next
to the simulation of that same step. The RSS counts everything the process maps (PyTorch's
allocator, MKL / oneDNN buffers, the Python heap), so it is expected a little above.

    python scripts/bench_scale.py --model swin4d_v9 --sizes 5m 51m
"""

from brainfm.bench.scaling import main

if __name__ == "__main__":
    main()
