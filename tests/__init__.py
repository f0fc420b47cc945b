"""phantomd's tests.

The end-to-end tests run on the reactor twistd gives phantomd: Twisted's
epoll reactor with ``fastio.lean_polling`` (events dispatched without a log
context, writes held until the end of each poll), not the plain one trial
installs.
"""

from twisted.internet import reactor

from phantomd.http.fastio import lean_polling

lean_polling(reactor)
