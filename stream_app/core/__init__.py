"""The transport-free core: intake, cache facade use, classifier, ordered emitter, batch reports.

Nothing under ``stream_app.core`` imports Faust or a Kafka client. The worker package feeds it chunks of
records fetched from Kafka and gives it a :class:`~stream_app.core.emitter.Sink` to produce to; the tests
and benchmarks feed it the same way without a broker.
"""
