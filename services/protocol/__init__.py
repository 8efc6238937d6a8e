"""The internal api <-> model wire contract: pydantic models and the one stream codec.

No FastAPI, no torch here: both services import this package.
"""
