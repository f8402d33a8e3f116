"""Agent rollout engine (the paper's Algorithm 1): engines, protocol parser, rollout loop.

Arrives with the rollout issue; the foundation only reserves the package. No Dagster imports.
"""
