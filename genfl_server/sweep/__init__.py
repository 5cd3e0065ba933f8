"""genfl-sweep: the poster's experiment grid (plan, run, report, figures)."""
