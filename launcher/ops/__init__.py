"""After sbatch: readers of Slurm's own tools (squeue, scontrol, sacct, sinfo, scancel) and of the
run dir, no daemon of ours.

- slurmtools:    thin wrappers around the tools, with timeouts, and their output parsers (pure); sacct
                 rows grouped into each job's attempts.
- sources:       what squeue, scontrol and sacct say about a set of job ids, asked once.
- reasons:       why a job ended: the status words, the signs a log shows, markers and exit codes weighed.
- status:        every job of a run dir: state, step, and the reason it ended (squeue -> scontrol ->
                 sacct -> the run dir's markers and logs), so it answers after the controller forgot.
- logs:          print or follow a run's logs until its jobs end; --rank / --node filters; a job's log
                 files, their tail and its last step line, for status and cost.
- cost:          GPU-hours and dollars really spent (sacct, every attempt), $ per 1M tokens trained.
- cluster_check: a cluster profile against the live cluster (sinfo, scontrol show partition/node).
- doctor:        each node's GPUs, packages, network and shared storage, probed in one job.

No module here imports torch or any other heavy library, nor anything of launcher/rank.
"""
