"""Test-only helpers (fault injection, weight dumps), read from the environment; never set in a real run."""
