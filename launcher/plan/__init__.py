"""Plan wing: the pure launch plan. types.py holds what the user asked for (LaunchOptions) and what it
becomes (LaunchPlan, Cmd); planner.py turns options + machine facts into commands (no process started);
ssh.py wraps a node's command for the ssh fan-out.

May import: launcher.errors, launcher.resources, launcher.backends, launcher.supervise.procs (the job token),
workers.contract (what the ranks are told)."""
