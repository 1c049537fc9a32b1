"""The main job: data, teacher, distillation, compression, frontier, Serve deployment, load
test and report.md, each stage resumed or skipped when re-run.

Locally:      python jobs/pipeline.py --config configs/digits.yaml
On a cluster: ray job submit --address ADDR --working-dir . -- python jobs/pipeline.py \
                  --config configs/digits.yaml --set storage_path=s3://BUCKET/runs
(an s3:// / gs:// URI, or an absolute path on a filesystem every node mounts, with
--set ray.shared_filesystem=true: a job's working directory is temporary).
On a cluster the deployment stays up after the job ends; locally this serves until Ctrl-C.
`--no-keep-serving` takes it down at the end instead. Same code as `distillery run`.
"""

import sys
from pathlib import Path

# A job submitted with --working-dir runs from an uploaded copy of the repo: find src/ there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distillery.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
