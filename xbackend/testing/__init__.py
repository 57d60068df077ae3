"""Fixtures and harnesses for tests and benchmarks (synthetic traces, a random Mimi, bench). The library never imports this."""
