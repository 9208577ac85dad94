"""Traces of page dirtying, writable-working-set analysis and the pre-copy simulator."""
