"""The run description: the typed spec with its combination checks, its layers (profile < file < flags <\n--set), the flags derived from it, and cluster profiles."""
