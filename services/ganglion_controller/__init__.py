"""Ganglion controller service."""
