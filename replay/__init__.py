"""Batch replays of recorded conversations, run as Ray jobs, measuring routing."""
