"""The gold-reward testbed: task families, gold rewards, prompts and simulated labelers."""
