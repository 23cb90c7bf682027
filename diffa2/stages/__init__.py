"""Training stages of the DIFFA-2 curriculum, each runnable as `python -m diffa2.stages.<name>`."""
