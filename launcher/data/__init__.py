"""Training data: finding and checking files (stdlib, login node) and building the token cache (datasets)."""
