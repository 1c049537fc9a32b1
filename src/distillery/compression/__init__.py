"""Compression: prune and quantize a trained model into variants, each a `model -> model` step.

`recipe` holds the typed step configs; `prune` and `quantize` the steps; `store` saves and
reloads a variant without pickle. None of it imports Ray.
"""
