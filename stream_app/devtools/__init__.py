"""Tools for development, tests and the demo: a local Apache Kafka, test clients, child processes.

Nothing in the worker's serving path needs this package; a user with a cluster of their own never runs it.
"""
