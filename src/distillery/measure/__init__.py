"""Measurement: timing a model as a replica runs it (`timing`), the evaluate stage's
accuracy table (`accuracy`), and the speed-accuracy frontier with its recommendation
(`frontier`). Nothing here trains or serves."""
