"""The agents role: the pull-mode HTTP API (register, heartbeat, lease, progress,
complete) through which agents pull tasks instead of being sent them.

Agents (browser userscripts, Python processes) register, lease pull tasks, report
progress with checkpoints, and complete, fail or release them. Every lease lives in
Mongo (`script_tasks.lease`) and every change is a compare-and-set on its token, so
the role keeps no state worth losing and several may run side by side.
"""
