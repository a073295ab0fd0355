"""Bundled PLC simulators for demos and tests."""
