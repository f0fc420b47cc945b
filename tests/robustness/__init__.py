"""Robustness suite: phantomd fails closed under faults, floods and hostile
input.

Everything here runs over real loopback sockets against fakes from
``fakes.py`` whose misbehaviour each test chooses: a token service, an API,
and a raw-bytes client.
"""
