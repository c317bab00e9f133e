"""Checks on result files before a job is marked succeeded (no decoding, no extra dependency)."""
from wan_model.pipeline.video import REQUIRED_BOXES, mp4_problem

__all__ = ["REQUIRED_BOXES", "mp4_problem"]
