"""sferp."""
