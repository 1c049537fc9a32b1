"""Serving: the Open Inference Protocol (`protocol`), a replica's model and how it runs
(`predictor`, `runner`), dynamic batching (`batcher`), the Ray Serve deployments
(`deployments`), putting a run on Serve (`deploy`) and the ingress Ray runs in front
(`ingress`, HAProxy by default)."""
