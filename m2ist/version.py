"""The installed m2ist version, in one place (the package face and the file writers read it here)."""

__version__ = "0.1.0"
