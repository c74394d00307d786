"""Experiment binaries: one absl program per published study (python -m experiments.<name>)."""
