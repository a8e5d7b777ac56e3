"""Launching training processes: the torchrun command, the job it runs, and the stop signals passed on to it."""
