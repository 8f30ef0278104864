"""fabric's benchmark suite: ``python -m bench`` (``--quick`` to check that it runs). See ``bench/README.md``."""
