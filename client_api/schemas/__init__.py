"""One JSON schema per endpoint request body; tests check them against the spec's examples."""
