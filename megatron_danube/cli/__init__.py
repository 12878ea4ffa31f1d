"""Command-line entry points (console scripts); each is a thin layer over the library."""
