"""Plan wing: the pure launch plan. types.py holds what the user asked for (LaunchOptions) and what it
becomes (LaunchPlan, Cmd); planner.py turns options + machine facts into commands (no process started);
ssh.py wraps a node's command for the ssh fan-out (its ssh options and remote shell line serve the
preflight's probes and mpirun's ssh too).

May import: launcher.errors, launcher.resources, launcher.backends, launcher.supervise.procs (the job token),
workers.contract (what the ranks are told)."""
