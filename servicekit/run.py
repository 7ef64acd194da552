"""Process entry for one service: ``python -m servicekit.run tickets``.

Monkey-patches eventlet before anything imports socket or threading, reads settings once,
configures JSON logs, and hands over to nameko's runner (SIGTERM/SIGINT stop gracefully).
"""
import warnings

# eventlet announces its own deprecation on import; it is our chosen runtime (nameko 2.x)
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet  # noqa: E402

eventlet.monkey_patch()

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402

from servicekit.config import ServiceSettings  # noqa: E402
from servicekit.logs import configure_logging  # noqa: E402

# the process name -> its nameko service class
SERVICES = {
    "tickets": "services.tickets.service:TicketsService",
    "routing": "services.routing.service:RoutingService",
    "gateway": "gateway.service:GatewayService",
}


def load_service_class(name: str):
    module_name, class_name = SERVICES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("service", choices=sorted(SERVICES))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = ServiceSettings.load(args.service)
    configure_logging(args.service, settings.log_level)
    from nameko.cli.run import run

    service_cls = load_service_class(args.service)
    logging.getLogger(__name__).info(
        "starting %s, http on %s:%s", args.service, settings.http_host, settings.http_port)
    _freeze_startup_heap(args.service)  # the imports: before any request
    eventlet.spawn_after(GC_FREEZE_AFTER_SECONDS, _freeze_startup_heap, args.service)
    run([service_cls], settings.nameko_config())


# Once a service is up, what it built to start (modules, SQLAlchemy's mappers and statements,
# nameko's extensions, schemas: some 80,000-120,000 objects) lives as long as the process.
# Left to the cyclic collector, every full collection scanned all of it again: in routing under
# load two or three a second, each stopping the process for 50-150 ms (measured with gc.callbacks),
# the largest single delay a ticket met on its way to an agent. Frozen, they are never scanned
# (refcounting still frees them); a full collection then takes a few milliseconds.
# Frozen twice: the imports before the container starts, then what starting it and the first
# requests built. Frozen only once, after 5 s, each process still made one or two full
# collections of 50-90 ms in its first seconds, and the freeze's own collection cost as much,
# in all three processes at the same moment: under load just after a start (a deploy, a
# restart), a stall every ticket in flight met.
GC_FREEZE_AFTER_SECONDS = 5.0


def _freeze_startup_heap(service: str) -> None:
    gc.collect()  # what startup left as garbage is not frozen with the rest
    gc.freeze()
    logging.getLogger(__name__).info("%s: %d startup objects frozen out of garbage collection",
                                     service, gc.get_freeze_count())


if __name__ == "__main__":
    main()
