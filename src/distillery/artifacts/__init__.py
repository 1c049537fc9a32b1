"""Model folders: the one way every stage saves a model and loads one back, whatever its format.

    artifacts.load(folder) -> (model, arch)      any format, verified (sha256) and unpickle-free
    artifacts.save_model / save_program          a trained or imported model (dense, exported)
    artifacts.save_dense / save_torchao / save_pt2e / save_cascade    a compressed variant

`folder` holds the shape every model folder has (`arch.json`, the weights, their sha256);
`formats` the registry of storage formats (`FORMATS`: how each is saved and read back).
Serving, evaluation, compression and search all load through `load`.
"""

from distillery.artifacts.folder import (
           ARCH_FILE,
           PROGRAM_FILE,
           WEIGHTS_FILE,
           read_arch,
           save_model,
           save_program,
)
from distillery.artifacts.formats import (
           FORMATS,
           Format,
           load,
           save_cascade,
           save_dense,
           save_pt2e,
           save_torchao,
)

__all__ = ["ARCH_FILE", "FORMATS", "Format", "PROGRAM_FILE", "WEIGHTS_FILE", "load", "read_arch",
           "save_cascade", "save_dense", "save_model", "save_program", "save_pt2e", "save_torchao"]
