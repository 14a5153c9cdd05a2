"""Shared by every test tier. pytest puts this folder on sys.path (no __init__.py here), so helper modules beside
this file, such as process_watch, import by name from tests/unit, tests/server and tests/gpu alike."""
