"""What Slurm's own tools say about a set of job ids, asked once: squeue (live jobs), scontrol (jobs the
controller still remembers) and sacct (every attempt, also after the controller forgot), and which of
them did not answer."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.ops import slurmtools as st
from launcher.ops.slurmtools import Attempt


@dataclass
class Sources:
    """What each tool said, gathered once for a set of job ids (and what failed)."""

    squeue: dict[str, dict[str, str]] = field(default_factory=dict)
    scontrol: dict[str, dict[str, str]] = field(default_factory=dict)
    sacct: dict[str, list[Attempt]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def gather(cls, job_ids: list[str]) -> "Sources":
        s = cls()
        if not job_ids:
            return s
        try:
            for row in st.squeue(job_ids):
                s.squeue[row["job_id"]] = row
        except st.SlurmToolError as exc:
            s.problems.append(str(exc))
        for jid in job_ids:
            try:
                for rec in st.scontrol_show_job(jid):
                    s.scontrol[st.display_id(rec)] = rec
            except st.SlurmToolError as exc:
                s.problems.append(str(exc))
        try:
            s.sacct = st.group_attempts(st.sacct(job_ids))
        except st.SlurmToolError as exc:
            s.problems.append(f"accounting (sacct) did not answer: {exc}")
        return s
