"""Prompt (and image) in, MP4 out, on one rank or on N ranks of one process group."""
