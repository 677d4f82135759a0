"""``cliplens app``: a local web page over the explain API (optional extra ``app``).

:mod:`.core` holds everything but HTTP (no web framework imported); :mod:`.server` is the
Starlette app; :mod:`.page` the page. Importing this package imports neither."""
