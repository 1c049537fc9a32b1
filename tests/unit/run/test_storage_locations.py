"""Runs at an s3:// or gs:// URI, against real servers on 127.0.0.1 (moto's S3, and
gcp-storage-emulator's GCS): paths and URIs,
verified copies, and a run that lives in the bucket alone — a node with an empty cache
picks it up where it stands, and a damaged object is refused or redone, never used.
(The cluster test runs the whole pipeline at a URI with Ray Train workers and Serve
replicas reading from the bucket.)"""


import pytest

from distillery.run import storage


def test_locations_join_and_unsupported_schemes_are_refused():
    assert storage.join("s3://b/runs", "tiny", "data/x.parquet") == "s3://b/runs/tiny/data/x.parquet"
    assert storage.join("s3://b/runs/?region=eu-west-1", "tiny") == "s3://b/runs/tiny?region=eu-west-1"
    assert storage.join("/shared/runs", "tiny") == "/shared/runs/tiny"
    assert storage.check_location("gs://bucket/runs") == "gs://bucket/runs"
    with pytest.raises(ValueError, match="hdfs:// is not supported"):
        storage.check_location("hdfs://namenode/runs")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.check_location("s3:///runs")
    with pytest.raises(ValueError, match="'..' are not allowed"):
        storage.check_location("s3://bucket/runs/../../etc")
