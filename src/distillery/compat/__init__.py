"""The one door to third parties' internals: every patch, private import, private path and
RAY_* variable distillery relies on, one module per concern (written against Ray 2.60,
tritonclient 2.x, torchvision 0.28, torch 2.13):

    ingress       which Serve ingress runs (RAY_SERVE_* variables) and `distillery-haproxy`,
                  which rewrites the HAProxy config Ray generates
    serve_grpc    Serve's gRPC listeners and Python proxy, patched for the protocol's clients
    logs          Ray's and Ray Train's console output, sent to the run's log
    worker        what every process Ray starts for a job runs first (Gloo's interface, the patches)
    environment   the other RAY_* switches (Ray Train, Tune, token authentication)
    torchvision   torchvision's wheels beside the CPU build of torch

Each module says why no public API serves. `tests/unit/compat/test_third_party_edges.py`
checks every private attribute and variable still exists with the shape used here, so an
upgrade fails there, naming what moved; no module outside this package names one.
"""
