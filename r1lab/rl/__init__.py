"""r1lab.rl."""
