//! Presence of every node: per-node connection counts with a heartbeat TTL.
