"""The manager core, backend-neutral: lifecycle (the manager loop), policy (pure OTP decisions), gate (calls in
front of a group), rpc (calls to one group), exits (how a process ended), events, topology (ranks and specs).

It drives a backend only through the contract in ``supervisor.backends.base``."""
