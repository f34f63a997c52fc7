"""VGG19 weights."""
