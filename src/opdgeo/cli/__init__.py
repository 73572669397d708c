"""Thin command-line layer: parse options, call the library, print results."""
