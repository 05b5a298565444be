"""Per-architecture tables, model loading, and the pruned model classes."""
