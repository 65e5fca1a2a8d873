"""The daemon's transport: MQTT in and out, input decoding, the outbox, payloads."""
