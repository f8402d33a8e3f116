"""Training stages (SFT-1/2/3 with TRL, GRPO RL-1/RL-2); arrives with the SFT and RL issues. No Dagster imports."""
