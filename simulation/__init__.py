"""The simulated fleet and what runs it: the simulator, the embedded broker, the demo."""
