"""r1lab.engine."""
