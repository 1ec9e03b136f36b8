"""The Celery worker: loads cached model pairs, runs the method, writes results to storage.

Start it with ``celery -A worker.celery_app worker``. torch is imported only when a job runs.
"""
