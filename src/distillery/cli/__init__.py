"""The command line: `distillery run|data|train|distill|evaluate|compress` (`main`) and
`distillery serve|query|loadtest` (`serve`). Parsing and messages only; the work is in the
stage folders."""
