"""The daemon's settings, their reference page and the snapshot the daemon runs on."""
