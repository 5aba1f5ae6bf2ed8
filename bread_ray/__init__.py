"""bread_ray: open, self-hosted prompt baking on Ray, driven by the git-based CLI `bgit`."""

__version__ = "0.1.0"
