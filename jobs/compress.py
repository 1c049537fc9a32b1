"""Compress the trained student (and teacher) into pruned and quantized variants; measure them.

Locally:     python jobs/compress.py --config configs/digits.yaml
On a cluster: ray job submit --address ADDR --working-dir . -- python jobs/compress.py \
                  --config configs/digits.yaml
(with a `storage_path` every node reaches, a shared folder or an s3:// / gs:// URI: a job's
working directory is temporary)
Same code as `distillery compress`; it needs the trained teacher and students (`jobs/train.py`,
`jobs/distill.py`).
Fine-tuning after pruning runs on Ray Train; the timing runs in this process, one thread.
"""

import sys
from pathlib import Path

# A job submitted with --working-dir runs from an uploaded copy of the repo: find src/ there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distillery.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
