"""Test helpers shipped with the package (scenario suites run on the real and the fake kernel)."""
