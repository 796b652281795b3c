"""Print windows/s of the ROI loader on the embedded data (`make bench`)."""

from brainfm.bench.roi_loader import main
from brainfm.config import repo_root

if __name__ == "__main__":
    main(repo_root() / "data" / "hcp_rest_roi.h5")
