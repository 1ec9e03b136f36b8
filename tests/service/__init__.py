"""Tests of the microservice: gateway, worker, storage, settings, deployment files."""
