"""Compression: prune and quantize a trained model into variants, each a `model -> model` step.

`steps` holds one handler per step kind (configs: `config.compress`); `prune` the pruning
methods, `cascade` how a cascade's threshold is chosen; the quantized forms themselves are
`models.quantized`, and every variant is saved and loaded through `artifacts`. `stage` runs
the whole compress stage. None of it imports Ray (fine-tuning goes through `training`).
"""
