"""Each task's torch-free answer layer: what `predict`, the server and the monitor answer, from NumPy outputs."""
