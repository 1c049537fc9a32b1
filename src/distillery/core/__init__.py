"""The foundation every other room stands on: errors (`errors`), atomic verified files
(`files`), console output (`console`), the model role names (`roles`) and the config schema
base (`schema`). Imports nothing else of distillery."""
