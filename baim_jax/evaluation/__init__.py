"""Data and measures."""
