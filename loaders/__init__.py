"""Loader plugins, one module each, registered through the `loadstar` entry-point group."""
