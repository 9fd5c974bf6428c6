"""Configuration: YAML loaded into frozen, typed models, every error with its path and line.

Listener and destination sections are validated by the model their ``type:``
registered (:mod:`gateway.registry`); the rest of the file by the models here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.registry import Kind, Registry

Loc = tuple[str | int, ...]


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(value: object) -> Endpoint:
    """``host:port`` (``[v6]:port`` for IPv6) -> Endpoint; the messages name the fault."""
    if isinstance(value, Endpoint):
        return value
    if not isinstance(value, str):
        raise ValueError("expected 'host:port'")  # noqa: TRY004 - pydantic wants ValueError
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected 'host:port', got {value!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unbalanced brackets in {value!r}")
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses as '[addr]:port', got {value!r}")
    digits = port_text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"port must be a number 1..65535, got {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1..65535")
    return Endpoint(host, port)


EndpointField = Annotated[Endpoint, BeforeValidator(parse_endpoint)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Site(Frozen):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    name: str = ""


class Http(Frozen):
    """The local HTTP API; off loopback every request needs ``Authorization: Bearer``."""

    listen: EndpointField | None = Endpoint("127.0.0.1", 9110)
    token_file: Path | None = None

    @model_validator(mode="after")
    def _token_off_loopback(self) -> Http:
        if self.listen is not None and self.token_file is None and not is_loopback(self.listen):
            raise ValueError(
                f"listen {self.listen} is not a loopback address: set token_file "
                "(a file holding the bearer token every request must present)"
            )
        return self


def is_loopback(endpoint: Endpoint) -> bool:
    if endpoint.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(endpoint.host).is_loopback
    except ValueError:
        return False


class JournalRetention(Frozen):
    """How long finished data stays in the journal (days; ``null`` keeps it for ever).

    Only envelopes whose every delivery is done are pruned; pending and dead ones never."""

    delivered_days: float | None = Field(default=30, gt=0)
    quarantine_days: float | None = Field(default=90, gt=0)
    sessions_days: float | None = Field(default=365, gt=0)
    interval_s: float = Field(default=3600, gt=0)


class JournalSettings(Frozen):
    inline_max_bytes: int = Field(default=256 * 1024, ge=0)
    min_free_mb: int = Field(default=512, ge=0)
    integrity_check: bool = True  # PRAGMA quick_check and blob files of pending deliveries
    retention: JournalRetention = JournalRetention()


class Logging(Frozen):
    level: str = "INFO"
    format: str = Field(default="text", pattern="^(text|json)$")

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("level must be DEBUG, INFO, WARNING or ERROR")
        return v


class Backoff(Frozen):
    initial_s: float = Field(default=1.0, gt=0)
    max_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> Backoff:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


class Breaker(Frozen):
    failures: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=30.0, gt=0)


class DeliveryPolicy(Frozen):
    """How one destination is fed (ARCHITECTURE.md, "Delivery").

    ``max_attempts: null`` (the default) never gives up on clinical data: it retries
    with the capped delay for ever, and reports the delivery as stuck after
    ``surface_after`` attempts.
    """

    workers: int = Field(default=1, ge=1, le=64)
    ordered: bool = True
    max_attempts: int | None = Field(default=None, ge=1)
    surface_after: int = Field(default=5, ge=1)
    backoff: Backoff = Backoff()
    breaker: Breaker = Breaker()

    @model_validator(mode="after")
    def _ordered_single(self) -> DeliveryPolicy:
        if self.ordered and self.workers != 1:
            raise ValueError("ordered delivery needs workers: 1 (set ordered: false for more)")
        return self


class ListenerBase(Frozen):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    type: str


class DestinationBase(Frozen):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    type: str
    delivery: DeliveryPolicy = DeliveryPolicy()


MatchValue = str | list[str]


class StepRef(NamedTuple):
    """One step of a route: its registered name and its validated parameters."""

    name: str
    params: BaseModel


def _step_ref(value: object) -> object:
    """``name`` or ``{name: {param: value}}`` -> (name, raw params); checked later."""
    if isinstance(value, StepRef):
        return value
    if isinstance(value, str):
        return (value, {})
    if isinstance(value, dict) and len(value) == 1:
        name, params = next(iter(value.items()))
        return (str(name), params or {})
    raise ValueError("a step is a name or {name: {parameters}}")


def _fold(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _header(headers: Mapping[str, str], key: str) -> str | None:
    """A header by a looser spelling: ``modality``, ``sop_class_uid`` and
    ``SOPClassUID`` all name the DICOM keyword headers the SCP records."""
    folded = _fold(key)
    for name, value in headers.items():
        if _fold(name) == folded:
            return value
    return None


class Route(Frozen):
    """``match`` keys: ``source``, ``kind`` or any envelope header; a list means any of.

    A route with ``steps`` hands the envelope to them (durably, retried like a
    delivery, in order unless ``delivery`` says otherwise); what the steps pass on
    or produce goes to ``to``, except what a step marks as a notification (header
    ``notify: "true"``, e.g. an HL7 priority message for the RIS), which goes to
    ``notify``. Give such a route an ``id`` so that work pending for it stays
    attached when routes are reordered.
    """

    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    match: dict[str, MatchValue] = Field(default_factory=dict)
    steps: tuple[Annotated[Any, BeforeValidator(_step_ref)], ...] = ()
    to: list[str] = Field(default_factory=list)
    notify: list[str] = Field(default_factory=list)
    delivery: DeliveryPolicy = DeliveryPolicy()

    @model_validator(mode="after")
    def _does_something(self) -> Route:
        if not self.to and not self.steps:
            raise ValueError("a route needs 'to' (destinations) or 'steps'")
        return self

    def matches(self, kind: str, source: str, headers: Mapping[str, str]) -> bool:
        for key, want in self.match.items():
            have = kind if key == "kind" else source if key == "source" else headers.get(key)
            if have is None:
                have = _header(headers, key)
            if have is None:
                return False
            if have != want if isinstance(want, str) else have not in want:
                return False
        return True


class Mqtt(Frozen):
    """Fleet telemetry to the province's MQTT broker (gateway/telemetry.py)."""

    url: str = Field(pattern=r"^mqtts?://[^/:]+(:\d+)?/?$")  # mqtt://host:1883, mqtts://host:8883
    topic_prefix: str = Field(min_length=1, pattern=r"^[^#+\s]+$")  # medgw/<province>/<site>
    client_id: str | None = None  # default: medgw-<site id>
    username: str | None = None
    username_file: Path | None = None  # secrets from files / systemd credentials
    password_file: Path | None = None
    ca_file: Path | None = None  # mqtts: the broker's CA (default: the system's)
    cert_file: Path | None = None  # mqtts with a client certificate
    key_file: Path | None = None
    patient_ids: str = Field(default="hashed", pattern="^(none|hashed|plain)$")
    hash_salt_file: Path | None = None  # default salt: the site id
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    state_interval_s: float = Field(default=30.0, gt=0)  # listener/destination state
    buffer_max: int = Field(default=100_000, ge=100)  # events kept while the broker is away
    events: tuple[str, ...] | None = None  # only these event kinds (default: all)

    @model_validator(mode="after")
    def _pairs(self) -> Mqtt:
        if self.username and self.username_file:
            raise ValueError("give username or username_file, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.url.startswith("mqtt://") and (self.ca_file or self.cert_file):
            raise ValueError("ca_file / cert_file need an mqtts:// url")
        return self

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def endpoint(self) -> Endpoint:
        rest = self.url.split("://", 1)[1].rstrip("/")
        host, _, port = rest.partition(":")
        return Endpoint(host, int(port) if port else (8883 if self.tls else 1883))


class Syslog(Frozen):
    """Where audit records go as RFC 5424 syslog (IHE ATNA style)."""

    url: str = Field(pattern=r"^(udp|tcp|tls)://[^/:]+:\d+$")  # tls://collector:6514
    ca_file: Path | None = None
    cert_file: Path | None = None  # tls with a client certificate (ATNA: mutual TLS)
    key_file: Path | None = None
    app_name: str = Field(default="medgw", pattern=r"^[!-~]{1,48}$")  # RFC 5424 APP-NAME
    hostname: str | None = Field(default=None, pattern=r"^[!-~]{1,255}$")  # default: the host's
    facility: int = Field(default=10, ge=0, le=23)  # 10 = security/authorization (authpriv)
    # RFC 5424 SD-ID name@enterprise-number (32473: the RFC 5612 example; use your own)
    sd_id: str = Field(default="medgw@32473", max_length=32, pattern=r"^[!#-<>-?A-\\^-~]+@\d+$")

    @model_validator(mode="after")
    def _tls_files(self) -> Syslog:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if not self.url.startswith("tls://") and (self.ca_file or self.cert_file):
            raise ValueError("ca_file / cert_file need a tls:// url")
        return self

    @property
    def endpoint(self) -> Endpoint:
        host, _, port = self.url.split("://", 1)[1].rpartition(":")
        return Endpoint(host, int(port))


class Audit(Frozen):
    """The append-only audit trail (gateway/audit.py)."""

    enabled: bool = True
    retention_days: int = Field(default=365, ge=1)
    patient_ids: str = Field(default="plain", pattern="^(none|hashed|plain)$")
    hash_salt_file: Path | None = None  # patient_ids: hashed; default salt: the site id
    queue_max: int = Field(default=100_000, ge=100)  # events waiting for the audit file
    syslog: Syslog | None = None


class ModelRef(Frozen):
    """An AI model: its id (named by route steps) and its card (YAML beside the .onnx)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    card: Path


class GatewayConfig(Frozen):
    site: Site
    state_dir: Path = Path("./var")
    http: Http = Http()
    journal: JournalSettings = JournalSettings()
    logging: Logging = Logging()
    mqtt: Mqtt | None = None
    audit: Audit = Audit()
    listeners: tuple[Any, ...] = ()
    destinations: tuple[Any, ...] = ()
    routes: tuple[Route, ...] = ()
    models: tuple[ModelRef, ...] = ()
    source_file: str = ""

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: tuple[ModelRef, ...]) -> tuple[ModelRef, ...]:
        ids = [m.id for m in v]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate model id {dup[0]!r}")
        return v

    def model_cards(self) -> dict[str, Path]:
        """Model id -> card path (relative paths from the config file's folder)."""
        base = Path(self.source_file).parent if self.source_file else Path()
        return {m.id: m.card if m.card.is_absolute() else base / m.card for m in self.models}


# -- loading ---------------------------------------------------------------------------


def _line_map(node: yaml.Node, path: Loc, lines: dict[Loc, int], problems: list[str]) -> None:
    """Record the 1-based line of every path in the document; flag duplicate keys."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                line = key_node.start_mark.line + 1
                problems.append(f"{format_loc((*path, key))}: duplicate key (line {line})")
            seen.add(key)
            _line_map(value_node, (*path, key), lines, problems)
            lines[(*path, key)] = key_node.start_mark.line + 1  # errors point at the key
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), lines, problems)


def format_loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _problem(loc: Loc, msg: str, lines: Mapping[Loc, int]) -> str:
    line = _line_of(loc, lines)
    where = f" (line {line})" if line else ""
    return f"{format_loc(loc)}: {msg}{where}"


def _pydantic_problems(err: ValidationError, prefix: Loc, lines: Mapping[Loc, int]) -> list[str]:
    out = []
    for e in err.errors():
        loc = (*prefix, *e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        elif e["type"] == "missing":
            msg = "required setting is missing"
        out.append(_problem(loc, msg, lines))
    return out


def _typed_sections(
    raw: object,
    section: str,
    kinds: Mapping[str, Kind],
    lines: Mapping[Loc, int],
    context: dict[str, Any],
) -> tuple[list[Any], list[str]]:
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [_problem((section,), "must be a list", lines)]
    models, problems = [], []
    for i, item in enumerate(raw):
        loc: Loc = (section, i)
        if not isinstance(item, dict):
            problems.append(_problem(loc, "must be a mapping with 'id' and 'type'", lines))
            continue
        type_ = item.get("type")
        if not isinstance(type_, str) or type_ not in kinds:
            known = ", ".join(sorted(kinds)) or "none installed"
            problems.append(
                _problem((*loc, "type"), f"unknown type {type_!r} (known: {known})", lines)
            )
            continue
        try:
            models.append(kinds[str(type_)].model.model_validate(item, context=context))
        except ValidationError as err:
            problems.extend(_pydantic_problems(err, loc, lines))
    return models, problems


def _raw_ids(raw: dict[str, Any], section: str) -> list[tuple[int, str]]:
    """(index, id) of every entry of a section that names an id, valid or not, so one
    bad entry does not also make every route that names it look wrong."""
    items = raw.get(section)
    if not isinstance(items, list):
        return []
    return [
        (i, item["id"])
        for i, item in enumerate(items)
        if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]


def _cross_check(
    cfg: GatewayConfig, raw: dict[str, Any], lines: Mapping[Loc, int], registry: Registry
) -> list[str]:
    problems = []
    for section in ("listeners", "destinations"):
        seen: dict[str, int] = {}
        for i, item_id in _raw_ids(raw, section):
            if item_id in seen:
                problems.append(
                    _problem(
                        (section, i, "id"),
                        f"duplicate id {item_id!r} (also {section}[{seen[item_id]}])",
                        lines,
                    )
                )
            seen[item_id] = i
    listener_ids = {item_id for _, item_id in _raw_ids(raw, "listeners")}
    dest_ids = {item_id for _, item_id in _raw_ids(raw, "destinations")}
    for r, route in enumerate(cfg.routes):
        for field_name in ("to", "notify"):
            for j, dest in enumerate(getattr(route, field_name)):
                if dest not in dest_ids:
                    known = ", ".join(sorted(dest_ids)) or "none"
                    problems.append(
                        _problem(
                            ("routes", r, field_name, j),
                            f"unknown destination {dest!r} (known: {known})",
                            lines,
                        )
                    )
        sources = route.match.get("source")
        for src in [sources] if isinstance(sources, str) else sources or []:
            if src not in listener_ids:
                known = ", ".join(sorted(listener_ids)) or "none"
                problems.append(
                    _problem(
                        ("routes", r, "match", "source"),
                        f"unknown listener {src!r} (known: {known})",
                        lines,
                    )
                )
        problems += _unknown_steps(route, r, lines, registry)
    return problems


def load_config(path: str | Path, registry: Registry) -> GatewayConfig:
    """Read and validate a config file; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: cannot read: {err}"]) from err
    return parse_config(text, registry, source=str(path))


def parse_config(text: str, registry: Registry, source: str = "<string>") -> GatewayConfig:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{source}: {where}{problem}"]) from err
    lines: dict[Loc, int] = {}
    problems: list[str] = []
    if node is not None:
        _line_map(node, (), lines, problems)
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the file must be a YAML mapping (site:, listeners:, ...)"])

    # plugins' validators may read files beside the config (analyzer profiles)
    context: dict[str, Any] = {
        "config_dir": str(Path(source).parent) if source != "<string>" else None
    }
    listeners, p1 = _typed_sections(
        raw.get("listeners"), "listeners", registry.listeners, lines, context
    )
    destinations, p2 = _typed_sections(
        raw.get("destinations"), "destinations", registry.destinations, lines, context
    )
    problems += p1 + p2
    rest = {k: v for k, v in raw.items() if k not in ("listeners", "destinations")}
    try:
        cfg = GatewayConfig.model_validate(
            {
                **rest,
                "listeners": tuple(listeners),
                "destinations": tuple(destinations),
                "source_file": source,
            }
        )
    except ValidationError as err:
        problems += _pydantic_problems(err, (), lines)
        raise ConfigError(problems) from err
    # steps may name AI models: they see the configured ones (id -> card path)
    context["models"] = cfg.model_cards()
    cfg, step_problems = _typed_steps(cfg, registry, lines, context)
    problems += step_problems
    problems += _cross_check(cfg, raw, lines, registry)
    if problems:
        raise ConfigError(problems)
    return cfg


def summary(cfg: GatewayConfig) -> str:
    return (
        f"OK: site {cfg.site.id}: {len(cfg.listeners)} listener(s), "
        f"{len(cfg.destinations)} destination(s), {len(cfg.routes)} route(s), "
        f"state in {cfg.state_dir}"
    )


def _unknown_steps(route: Route, r: int, lines: Mapping[Loc, int], registry: Registry) -> list[str]:
    out = []
    for j, step in enumerate(route.steps):
        if not isinstance(step, StepRef):
            known = ", ".join(sorted(registry.steps)) or "none installed"
            out.append(
                _problem(
                    ("routes", r, "steps", j), f"unknown step {step[0]!r} (known: {known})", lines
                )
            )
    return out


def _typed_steps(
    cfg: GatewayConfig, registry: Registry, lines: Mapping[Loc, int], context: dict[str, Any]
) -> tuple[GatewayConfig, list[str]]:
    """Validate each step's parameters with the model its name registered."""
    problems: list[str] = []
    routes = []
    for r, route in enumerate(cfg.routes):
        refs: list[Any] = []
        for j, (name, params) in enumerate(route.steps):
            kind = registry.steps.get(name)
            if kind is None:
                refs.append((name, params))
                continue
            try:
                refs.append(StepRef(name, kind.model.model_validate(params, context=context)))
            except ValidationError as err:
                problems += _pydantic_problems(err, ("routes", r, "steps", j, name), lines)
        routes.append(route.model_copy(update={"steps": tuple(refs)}))
    return cfg.model_copy(update={"routes": tuple(routes)}), problems


def route_key(route: Route, index: int) -> str:
    """The journal's destination name for a route's steps."""
    return f"steps:{route.id or index}"
