"""ProductLens pipeline steps: one module per step, each with a small CLI."""
