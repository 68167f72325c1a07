"""Event feeds that announce new images as references on the input topic."""
