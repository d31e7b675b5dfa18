"""HTML templates of the hosted contact form (package data)."""
