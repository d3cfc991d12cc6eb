"""Ganglion decision service."""
