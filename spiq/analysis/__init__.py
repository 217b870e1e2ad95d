"""Why a quantized model is good or bad: per-layer error, channel ranges, error maps, attention
(layers), attribution drift (attribution), accuracy over labelled images (evaluate), sweeps of
methods × bits (sweep, sweep_report)."""
