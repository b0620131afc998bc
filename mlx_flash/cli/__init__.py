"""The command line: one module per command; imported by nothing in the package."""
