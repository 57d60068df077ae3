"""Pure functions on traces: metrics, the diagnosis, explanations, diffs, inspection, words."""
