"""A run: its folder or object-store URI (`storage`), its manifest of stages, fingerprints and
verified files (`rundir`), and the Ray cluster it runs on (`cluster`)."""
