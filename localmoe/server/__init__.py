"""`localmoe serve`: an OpenAI- and Ollama-compatible HTTP server for one model at a time.

engine.py   the worker thread that owns the Model, its FIFO queue and prompt cache
app.py      the Starlette app: routes, API key, CORS, /health /props /v1/experts /tokenize
openai_api.py, ollama_api.py   the two APIs; params.py validates their requests
reasoning.py   <think> splitting; static/   the chat page
"""
from .app import create_app
from .engine import ApiError, Engine, GenRequest

__all__ = ["ApiError", "Engine", "GenRequest", "create_app"]
