"""`egrsd experiment`: several methods x seeds from one base model, evaluated on the same held-out
problems, with paired bootstrap statistics and plots; `egrsd inspect`: one rollout's tokens coloured
by teacher entropy, gate weight and lookahead lift. Nothing heavy is imported here."""
