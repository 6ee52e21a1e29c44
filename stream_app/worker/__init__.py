"""The Faust worker: the only package of emotion-stream that imports faust."""
