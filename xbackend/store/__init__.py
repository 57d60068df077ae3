"""On-disk formats: the trace writer and loader, the run directory, output claims and locks, JSON checks."""
