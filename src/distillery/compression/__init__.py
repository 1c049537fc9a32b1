"""Compression: prune and quantize a trained model into variants, each a `model -> model` step.

`recipe` holds the typed step configs; `prune` and `quantize` the steps; `store` saves and
reloads a variant without pickle. None of it imports Ray.
"""

import logging
import warnings

# torchao registers enums with torch's pytree on import, and torch answers each with a
# deprecation warning; on a CPU build torchao also warns that its CUDA kernels did not load.
# Neither is actionable here, and both would print in every Ray worker.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("torchao").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's, on deepcopy of an export
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)  # inductor int8 lowering
