"""Datasets: any source -> seeded, stratified Parquet shards with a verified manifest.

`prepare` turns one source into train/val/test shards in one folder; `load_split` reads a
split back as tensors for plain PyTorch; `shard_paths` names the same verified files, which
the driver hands to Ray Data (`training.on_ray.read_shards`); `decode_batch` turns a batch
from either path into the same tensors.

`sources` reads the images (a registry of loaders), `prepare` splits and writes them,
`shards` is the format every later stage reads.
"""

from distillery.data.prepare import prepare, prepare_transfer, split_indices
from distillery.data.shards import (
                                    MANIFEST_FILE,
                                    SPLITS,
                                    decode_batch,
                                    encode_table,
                                    load_split,
                                    read_manifest,
                                    shard_paths,
)
from distillery.data.sources import SOURCES, Source, load_source

__all__ = ["MANIFEST_FILE", "SOURCES", "SPLITS", "Source", "decode_batch", "encode_table", "load_source",
           "load_split", "prepare", "prepare_transfer", "read_manifest", "shard_paths", "split_indices"]
