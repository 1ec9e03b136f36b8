"""The HTTP gateway: validates requests, stores inputs, enqueues jobs, reports their state.

It never imports torch (nor ``cgidm_core``): it enqueues by task name and reads job records.
"""
