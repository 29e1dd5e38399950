"""Measuring memorization: similarity, replication, detection, utility."""
