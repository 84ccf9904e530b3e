"""Pieces every pipeline step shares: atomic I/O and typed params loading."""
