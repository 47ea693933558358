"""Benchmarks behind `mixloop bench ...`: each prints JSON (and a table) with the numbers it measured."""
