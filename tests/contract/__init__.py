"""Contract suites: one behaviour, every backend."""
