"""cgidm: the shared layer of the service (settings, storage, job records, registry) and the CLI.

Nothing in this package imports torch or FastAPI at import time: the gateway imports it, and so
does the worker. The method itself lives in ``cgidm_core``.
"""

__version__ = "0.1.0"
