"""Where inputs lie without data (laws from BatchNorm statistics, propagated through the graph), the
range chosen for a bit width, and ranges observed on calibration images."""
