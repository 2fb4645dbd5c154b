"""Benchmarks, answer parsing and metrics, the LLM judge, model answerers and result reports."""
