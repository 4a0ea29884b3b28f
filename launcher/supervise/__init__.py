"""Supervise wing: the run-time side. job.py runs a plan (run directory, restarts, failure report),
supervisor.py starts the commands and streams their output, watch.py reads the ranks' files for hangs and
failures, procs.py is the process table, reaper.py the watchdog that outlives the launcher, node.py the agent
around each host's command in an ssh fan-out.

May import: launcher.backends, launcher.plan, launcher.errors, launcher.resources, workers.events,
workers.contract (the ranks' files and environment), workers.files, workers.config (the run's config.yaml)."""
