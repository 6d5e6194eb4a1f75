"""r1lab.rewards."""
