"""The data path's parts keep to the interfaces they meet at."""

from twisted.trial import unittest
from zope.interface.verify import verifyClass

from phantomd.http import interfaces, wire
from phantomd.http.front import FrontProtocol
from phantomd.http.listener import FrontFactory
from phantomd.http.upstream import UpstreamConnection, UpstreamPool
from phantomd.token.gate import Gate


class InterfaceTests(unittest.TestCase):
    def test_the_front_is_an_exchange(self):
        self.assertTrue(verifyClass(interfaces.IExchange, FrontProtocol))

    def test_the_front_consumes_the_request_reader(self):
        self.assertTrue(verifyClass(wire.IRequestConsumer, FrontProtocol))

    def test_the_factory_holds_the_readers_limits(self):
        self.assertTrue(verifyClass(wire.IRequestLimits, FrontFactory))

    def test_the_upstream_connection(self):
        self.assertTrue(verifyClass(interfaces.IUpstreamConnection,
                                    UpstreamConnection))

    def test_the_pool(self):
        self.assertTrue(verifyClass(interfaces.IUpstreamPool, UpstreamPool))

    def test_the_gate(self):
        self.assertTrue(verifyClass(interfaces.IGate, Gate))
