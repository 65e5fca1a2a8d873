"""edgecast training: synthetic fleet, data preparation, LSTM forecasters, ONNX export and calibration.

Importing this package never imports torch; the commands that need it import it themselves.
"""
