"""The command line: parses, calls, prints. Errors map to exit codes in one place."""
