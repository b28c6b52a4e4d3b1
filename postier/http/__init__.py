"""The HTTP layer: listeners for roles http (80) and https (443), and what they serve."""
