"""Deterministic simulation of Raft clusters on virtual time, and a linearizability checker."""
