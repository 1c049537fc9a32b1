"""Training: one epoch loop for every path (`loop.run_epochs`), the objective it trains
against (`objective`, `losses`, `hints`), the typed job sent to Ray Train workers (`job`),
parallelism as a strategy applied to an unchanged model (`parallel`, `data_parallel`,
`pipeline_parallel`), per-rank checkpoints (`checkpoint`), and the Ray edge (`on_ray`,
`epoch_feed`: epochs to the driver as they end, `logits_cache`)."""
