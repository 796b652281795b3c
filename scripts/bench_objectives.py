"""Print training steps/s of every objective at its small CPU size (`make bench`)."""

from brainfm.bench.objectives import main
from brainfm.logs import tidy_logging

if __name__ == "__main__":
    tidy_logging()
    main()
