"""vecsearch: image similarity search inside PostgreSQL."""

__version__ = "0.1.0"
