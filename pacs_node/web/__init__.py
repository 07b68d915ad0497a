"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and the status page, served over HTTP by the node.

The only code that imports starlette/uvicorn. Handlers are thin: they parse the request, call
the index (index/query.py, the same matching as C-FIND), the one verified read-back
(retrieve/readback.py) or ingest (the same durable path as C-STORE), and shape the answer.
"""
