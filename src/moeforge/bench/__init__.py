"""Benchmarks behind `moeforge bench`; each times its baseline in the same run and reports the ratio."""
