"""What users read: the runner that executes the notebooks, their HTML reports, the index and the README
headline."""
