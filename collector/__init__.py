"""The logferry collector: receives, stores, serves and dispatches."""
