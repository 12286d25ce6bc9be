"""Workers: one shared loop (ack policy, retries, status, logs) and one module per source."""
