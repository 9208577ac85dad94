"""Experiments: the demo, the paper's measurements and the baselines, on the layers below."""
