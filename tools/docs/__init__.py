"""Checks of the built documentation site."""
