"""The local backend's mechanism: worker processes are children of this supervisor on this host.

backend (the Backend object) · group (one dp group's processes and queues, the start-up handshake) · process (one
worker process handle) · monitor (sentinels + heartbeats) · escalation (stop a whole process tree) · startmethod
(spawn / forkserver with torch preloaded / fork)."""
