"""distillery's Ray Serve application: the typed builder `serve run` and `serve deploy` call.

    distillery serve build runs/digits -o serve/digits.yaml   # one application per model + auto + /v2
    serve run serve/digits.yaml                               # or: serve deploy (a running cluster)

Each entry of the YAML names this builder with its own `args` (validated into `AppArgs`).
The deployments live in the library (`distillery.serving.serve_apps`) so replicas import them from the
installed package wherever they run.
"""

from ray.serve import Application

from distillery.serving.serve_apps import AppArgs, build_application


def build_app(args: AppArgs) -> Application:
    return build_application(args)
