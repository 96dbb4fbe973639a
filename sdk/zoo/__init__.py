"""Small real models trained on data that ships inside packages, for demos, tests and benchmarks."""
