"""Each task's torch-free facts: its metric names, the config rules only it understands, how images reach its model."""
