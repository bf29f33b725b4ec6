"""Wyoming server for Chatterbox Turbo text to speech."""

__version__ = "0.1.0"
