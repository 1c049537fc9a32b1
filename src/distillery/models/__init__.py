"""Models: the architectures, each built from a JSON spec (`architectures` holds the
registry; `cnn`, `resnet` one architecture each), and a model folder on disk (`artifact`:
safetensors weights plus `arch.json`, verified by sha256)."""
