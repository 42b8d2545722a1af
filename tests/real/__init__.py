"""Real CT end to end: public scanner series through a running node."""
