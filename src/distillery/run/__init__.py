"""The run directory: a run's folder or object-store URI (`storage`) and its manifest of
stages, fingerprints and verified files (`rundir`)."""
