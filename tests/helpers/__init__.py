"""Helpers the tests share (modules) and the scripts they run in other processes."""
