"""The teacher and the auxiliary networks of the embedded default, trained once and cached by config hash."""
