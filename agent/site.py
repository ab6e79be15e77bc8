"""Which agent, at which site: the names a fleet of agents is told apart by.

A utility runs one agent per substation and watches them together, so every alert record says
which agent raised it and where (``observer.name``, ``observer.hostname``, ``labels.site``), every
syslog message carries both in its structured data, and the metrics endpoint exports one info
series ``otwatch_agent_info{site, agent, version}``.  The site is *not* a label on every metric
series: the central Prometheus adds it as a target label (``deploy/fleet/``), where it belongs.

>>> ident = SiteIdentity("substation-north", "sensor-7", hostname="pi7")
>>> rec = ident.stamp({"observer": {"vendor": "otwatch"}, "message": "m"})
>>> rec["observer"], rec["labels"]
({'vendor': 'otwatch', 'name': 'sensor-7', 'hostname': 'pi7'}, {'site': 'substation-north'})
>>> check_name("north/1", "--site")
Traceback (most recent call last):
...
agent.errors.InputError: --site 'north/1': expected 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from .errors import InputError

DEFAULT_SITE = "default"
# Fits a Prometheus label value, a syslog SD-PARAM, a DNS label and a file name alike.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise InputError(f"{what} {value!r}: expected 1-63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


def default_agent_name() -> str:
    """The host's short name when it makes a valid agent name, else ``otwatch``."""
    name = socket.gethostname().split(".")[0]
    return name if NAME.match(name) else "otwatch"


@dataclass(frozen=True)
class SiteIdentity:
    site: str = DEFAULT_SITE
    agent: str = ""  # empty: the host's name
    hostname: str = ""  # empty: socket.gethostname()

    def __post_init__(self):
        if not self.agent:
            object.__setattr__(self, "agent", default_agent_name())
        if not self.hostname:
            object.__setattr__(self, "hostname", socket.gethostname())

    def stamp(self, rec: dict) -> dict:
        """Add ``observer.name``/``observer.hostname`` and ``labels.site`` to an ECS record (in place;
        other observer and labels fields are kept)."""
        rec.setdefault("observer", {}).update({"name": self.agent, "hostname": self.hostname})
        rec.setdefault("labels", {})["site"] = self.site
        return rec

    @classmethod
    def from_args(cls, args, config=None) -> "SiteIdentity":
        """``--site``/``--agent-name`` over the configuration's ``[identity]`` over the defaults."""
        site = getattr(args, "site", None) or (config.identity.site if config is not None else DEFAULT_SITE)
        agent = getattr(args, "agent_name", None) or (config.identity.agent if config is not None else "")
        check_name(site, "--site")
        if agent:
            check_name(agent, "--agent-name")
        return cls(site, agent)


def add_arguments(p) -> None:
    g = p.add_argument_group("site identity (fleet)")
    g.add_argument("--site", metavar="NAME", default=None,
                   help=f"the site this agent watches, in alert records, syslog and metrics "
                        f"(default: identity.site of the configuration, else {DEFAULT_SITE!r})")
    g.add_argument("--agent-name", metavar="NAME", default=None,
                   help="this agent's name (default: identity.agent of the configuration, else the host name)")
