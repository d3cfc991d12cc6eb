"""Ganglion sensing service."""
