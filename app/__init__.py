"""The HTTP gateway: validates requests, stores inputs, enqueues jobs, reports their state.

It never imports torch: it enqueues by task name and reads job records. Of the method library it
imports only the torch-free vocabulary (``cgidm_core.names``, ``cgidm_core.errors``).
"""
