"""Small shared helpers: atomic file writes, seeding, environment description."""
