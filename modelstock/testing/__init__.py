"""Test and benchmark support shipped with the library (as ``torch.testing`` is): synthetic
checkpoint families, a procedural checkpoint source and a loopback store simulator.

Nothing in ``modelstock`` proper imports this package."""
