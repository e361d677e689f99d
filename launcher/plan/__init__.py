"""Every number derived from a spec, computed once: batch arithmetic, parameters, hardware, memory, FLOPs, $."""
