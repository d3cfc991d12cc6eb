"""Ganglion executor service."""
