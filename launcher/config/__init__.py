"""The run description: the typed spec, its layers and flags, and the checks made before anything starts."""
