"""The run dir: the files every process of a run shares, one module per file and one home for each name."""
