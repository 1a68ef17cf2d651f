"""Training recipes: one function per method, executed by every Ray Train worker."""
