"""Synthetic specimens, procedural insects and the held-out quality collections."""
