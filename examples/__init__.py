"""Example pipelines (YAML), shipped as package data: `trainguard.resources.examples_dir()`."""
