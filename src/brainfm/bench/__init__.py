"""Benchmarks behind ``make bench``: they print tables; nothing here is a test."""
