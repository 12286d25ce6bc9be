"""The broker's page: runs, live progress and previews in the browser (``setup_page``).

A view of the status store, server-rendered with Jinja2 templates, kept live by Server-Sent
Events fed by the store's changes, with previews computed from the written files in a separate
process and cached. See ``app.py`` for the routes.
"""
