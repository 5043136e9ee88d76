"""raretask: predict, reproduce and fix the rare tasks small models fail to learn."""

__version__ = "0.1.0"
