"""Evaluations whose results go into the run report (tokenizer compression, and later CORE / chat evals)."""
