"""Serving: the Open Inference Protocol (`protocol`, `http`, `grpc_codec`), a replica's model
(`predictor`), dynamic batching (`batcher`), the Ray Serve applications (`serve_apps`, with
`grpc_app`), putting a run on Serve and keeping it there (`launch`), `auto`'s policy
(`auto_policy`, no Ray) and its router in the replicas (`auto_router`), metrics (`metrics`,
`tally`, `prometheus`, `top`) and the firewall rules a node applies (`firewall`). The ingress
Ray runs in front is `compat.ingress`."""
