"""Structure masks: attach -> train -> decide -> materialise."""
