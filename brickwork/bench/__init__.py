"""Benchmarks that print ratios against named baselines, measured side by side in one process."""
