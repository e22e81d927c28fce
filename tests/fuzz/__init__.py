"""Property-based fuzz tests of the parsers that take untrusted bytes (docs/fuzzing.md)."""
