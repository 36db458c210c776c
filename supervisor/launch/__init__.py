"""Run unmodified torchrun scripts under the supervisor: ``rankvisor-run`` (torchrun's flags) or ``workload=script``.

cli (torchrun's flags -> the Hydra config) · checks (what a script run needs of the config) · run (the launcher's
loop over the Supervisor: join every rank, ride out restarts, report) · rootcause (torchrun's failure summary from
the ranks' @record error files). The rank side is worker/script.py; the processes are the local backend's, watched,
restarted and stopped by the same Lifecycle, policy and escalation as RPC workers.

Past one machine (``--nnodes``): jobspec (the flags -> JobSpec) · rendezvous (rounds through torch's own
rendezvous, node descriptions, the store and its standby) · keepalive (this node's pulse, the store's health, a
round's view of the other nodes) · budget (the decisions: restart budget, quorum) · noderound (one round of this
node's tree) · job (the loop over rounds, failover, the end).
"""
