"""The web console and admin API."""
