"""The data path: the front HTTP/1.1 server and the upstream connection pool.

Plain Twisted protocols over httptools (llhttp), not ``twisted.web``: a cache
hit must cost a small fraction of what a ``twisted.web`` request does.  The
rest of phantomd knows this package only through ``listener.FrontFactory`` and
``upstream.UpstreamPool``.
"""
