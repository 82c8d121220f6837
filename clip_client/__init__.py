"""A client for clip-server, needing only httpx and numpy (Pillow if you pass PIL images,
tqdm for progress bars).

    from clip_client import Client
    with Client("http://127.0.0.1:8000") as c:
        vectors = c.embed_texts(["a red circle", "a blue square"])  # (2, E) float32

It imports nothing of the server (`clip_core`, `service`, torch): tests check it.
"""

from .aio import AsyncClient
from .client import Client
from .errors import CallerError, ClipError, RetryableError, ServerFault
from .retry import RetryPolicy
from .wire import Classification, LabelScore, Limits, Similarity

__all__ = ["AsyncClient", "CallerError", "Classification", "Client", "ClipError",
           "LabelScore", "Limits", "RetryPolicy", "RetryableError", "ServerFault",
           "Similarity"]
