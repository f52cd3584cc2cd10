"""Host outputs: metric names, statistics, CSV, markdown, figures, TensorBoard and the reports."""
