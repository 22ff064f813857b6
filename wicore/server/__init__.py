"""OpenAI-compatible HTTP server over the Engine (FastAPI + uvicorn).

``app.create_app`` builds the ASGI app around an ``EngineLoop`` (a thread that
owns the engine and runs ``schedule -> execute -> update``); ``cli.main`` is the
``wicore serve`` command. Two backends: the real runtime (``TorchBackend``) and
the simulator paced to the wall clock (``sim_loop``, the "digital twin").
"""
