"""Offline evaluation tasks shared by the tests and the benchmark harness."""
