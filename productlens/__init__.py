"""The `productlens` command: one entry point for the recommender, the label review and publishing."""
