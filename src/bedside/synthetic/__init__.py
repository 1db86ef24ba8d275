"""Labelled SYNTHETIC data generators for tasks where no real data can be had offline here
(no labelled 12-lead arrhythmia set ships in any package). Everything built from them says so."""
