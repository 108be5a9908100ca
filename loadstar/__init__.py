"""Loadstar."""
