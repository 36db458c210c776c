"""Run unmodified torchrun scripts under the supervisor: ``rankvisor-run`` (torchrun's flags) or ``workload=script``.

cli (torchrun's single-node flags -> the Hydra config) · checks (what a script run needs of the config) · run (the
launcher's loop over the Supervisor: join every rank, ride out restarts, report) · rootcause (torchrun's failure
summary from the ranks' @record error files). The rank side is worker/script.py; the processes are the local
backend's, watched, restarted and stopped by the same Lifecycle, policy and escalation as RPC workers.
"""
