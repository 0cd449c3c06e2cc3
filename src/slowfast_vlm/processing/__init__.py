"""Turning videos, images and text into model inputs."""
