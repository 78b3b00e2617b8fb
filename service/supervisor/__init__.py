"""The supervisor's parts, wired together by the facade in service/controller.py.

- `ledger` — every store write (runs, stages, incidents, checkpoints, events) and the per-run locks;
- `catalog` — the checkpoints workers reported: verification, quarantine, the resume point;
- `executor` — a finding becomes an incident, the policy decides, the decision is carried out;
- `ingest` — the watch cycle: fetch signals, buffer them, detect; Alertmanager's alerts;
- `driver` — one thread per run walking its stages and owning the worker group;
- `goodput` — productive step time over wall time;
- `stage` — the in-memory view of a running stage and of a recovery in flight.
"""
