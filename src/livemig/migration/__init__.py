"""The migration engine: stages, the pre-copy planner, and the source and destination roles."""
