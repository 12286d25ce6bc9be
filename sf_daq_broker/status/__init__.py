"""Job status: the store behind /run_status and the follower that feeds it from status events."""
