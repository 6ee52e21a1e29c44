"""The Faust worker: the only package that imports faust.

``app`` composes the transport-free core (``stream_app.core``) with Faust's group membership, tables and
timers; ``faust_glue`` holds every use of Faust internals; ``sink`` produces with aiokafka's batch API;
``health`` serves metrics and probes.
"""
