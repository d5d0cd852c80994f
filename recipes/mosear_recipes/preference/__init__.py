"""Preference tuning of the MERR recipe: consistency-aware pairs, DPO on TRL, and the conflict-set comparison."""
