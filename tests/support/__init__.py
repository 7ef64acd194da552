"""Support code shared by the integration and e2e suites: the test broker and its vhosts
(``broker``), a raw AMQP client (``amqp``), polling (``polling``), free ports (``ports``) and a
TCP proxy that simulates a broker outage (``tcp_proxy``).

Nothing here imports eventlet: ``tcp_proxy`` also runs as a plain process of its own.
"""
