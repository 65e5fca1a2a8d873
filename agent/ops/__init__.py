"""Running the daemon: metrics, Home Assistant, rollout, releases, systemd notify, logs, CPU placement."""
