"""Drop-in replacements for APIs geomgen supersedes.

``geomgen.compat.scenesmith``: SceneSmith's geometry generation server, its
client, its request/response classes and its command line, served by geomgen's
broker and HTTP gateway (docs/scenesmith.md).
"""
