"""Result cache: keys (normalised text + model identity), L1 LRU, L2 value codec, L2 admission.

No Faust here: ``app.py`` owns the RocksDB-backed table and uses :mod:`.codec` for its values.
"""

from __future__ import annotations

from stream_app.cache.admission import Admission, AlwaysAdmit, SecondSightingAdmission
from stream_app.cache.codec import CODEC_VERSION, CachedResult, decode, encode
from stream_app.cache.keys import KEY_BYTES, ModelIdentity, cache_key, normalise
from stream_app.cache.lru import TtlLru

__all__ = [
    "CODEC_VERSION",
    "KEY_BYTES",
    "Admission",
    "AlwaysAdmit",
    "CachedResult",
    "ModelIdentity",
    "SecondSightingAdmission",
    "TtlLru",
    "cache_key",
    "decode",
    "encode",
    "normalise",
]
