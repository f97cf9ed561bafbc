"""Offline RL: Minari datasets (and local D4RL-style ones), the staged agent, Gymnasium
evaluation and the results report."""
