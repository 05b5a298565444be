"""vtrans."""
