"""What only reads a study: best, status, report, dashboard, progress."""
