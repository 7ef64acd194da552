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
    run([service_cls], settings.nameko_config())


if __name__ == "__main__":
    main()
