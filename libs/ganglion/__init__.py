"""Ganglion: sense -> decide -> act for GPU clusters."""

__version__ = "0.1.0"
