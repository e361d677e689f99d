"""Side effects that start work: the local launch of ranks, Slurm submission, staging hub files."""
