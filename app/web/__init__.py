"""The web app served at ``/``: pages for people who would rather look than read JSON.

Templates (Jinja2), one small vanilla script and one stylesheet ship in this package; nothing
is loaded from a CDN. The pages are shells: the browser keeps the API key for the session
(``sessionStorage``) and calls the same JSON API as every other client; the evidence itself is
rendered here, in Python, as an HTML fragment (``evidence.py``), so the page and the downloadable
report (``GET /jobs/{id}/report.html``) say exactly the same thing.
"""
