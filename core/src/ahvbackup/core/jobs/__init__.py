"""Jobs: backup, restore, verify and estimate, built from the drivers the configuration picks."""
