"""Tools around the daemon: benchmark, load generator, replay, model and schema commands."""
