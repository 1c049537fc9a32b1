"""The pipeline: the stages in order, what each reads and writes, and when one is done
already (`stages`); the run's one-page report (`report`)."""
