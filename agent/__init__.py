"""edgecast agent: the edge daemon that turns MQTT sensor streams into forecasts and anomaly alerts."""

__version__ = "0.1.0"
