"""r1lab.model."""
