"""Off-site replication: workers that drain the durable job queue into the target."""
