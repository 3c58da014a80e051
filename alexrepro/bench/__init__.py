"""Benchmarks (`alexrepro bench …`): each stage timed beside a baseline in the same run, reported as ratios."""
