"""Search distilled, compressed students on Ray Tune and keep the best one within a budget.

Locally:     python jobs/search.py --config configs/digits.yaml --max-p50-ms 0.2
On a cluster: ray job submit --address ADDR --working-dir . -- python jobs/search.py \
                  --config configs/digits.yaml
(with a `storage_path` every node reaches, a shared folder or an s3:// / gs:// URI: a job's
working directory is temporary; Tune's experiment lives there too, so a resubmitted job resumes it)
Same code and flags as `distillery search`; it trains the teacher and students first if they are missing.
Trials run as Ray actors (search.cpus_per_trial each) on any node; the timing runs in this process,
one thread.
"""

import sys
from pathlib import Path

# A job submitted with --working-dir runs from an uploaded copy of the repo: find src/ there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distillery.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
