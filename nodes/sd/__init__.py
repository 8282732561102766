"""Stable Diffusion machinery: torch code with no engine imports."""
