"""r1lab.stages."""
