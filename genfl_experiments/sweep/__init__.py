"""genfl-sweep: the poster's experiment grid (plan and run; reports and figures are one level up)."""
