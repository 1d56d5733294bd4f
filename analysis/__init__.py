"""Plots and reports drawn from run directories alone (never from inside training code)."""
