"""One Settings Struct per process, filled from CLI flags, then `SDSERVE_*` environment variables, then
defaults (a flag wins over the environment). Printed at start-up with secrets masked.

Each setting has one variable, `SDSERVE_` + its field name in capitals (`--api-key` is `SDSERVE_API_KEYS`,
comma-separated; `--no-playground` is `SDSERVE_PLAYGROUND=false`); `--help` names it beside every flag. Any
other `SDSERVE_*` variable stops the server at start-up, naming the variable meant, unless it is one of
`OTHER_VARIABLES`: a misspelt `SDSERVE_API_KEY` would otherwise leave a server open that its operator
believes closed."""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from server.tenants import Tenant, parse_line

Role = Literal["standalone", "node", "router"]
SECRETS = ("api_keys", "node_token", "admin_key")
# Loopback and the private ranges (RFC 1918, IPv6 ULA): where nodes live. Not link-local (169.254/16 holds
# cloud metadata services) nor public addresses, so a token holder cannot make the router probe them.
PRIVATE_NETWORKS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
OPENAI_MODEL_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
Positive = Annotated[int, Meta(ge=1)]
Count = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0)]
# SDSERVE_* variables that are not settings: other parts of sdserve read them, and a server accepts them.
OTHER_VARIABLES = {
    "SDSERVE_CACHE_DIR": "engines: the TensorRT execution provider's engine cache (default ~/.cache/sdserve)",
    "SDSERVE_SCREENSHOTS": "tests: where the playground tests save their screenshots",
    "SDSERVE_CHROMIUM": "tests: the Chromium binary the playground tests drive",
    "SDSERVE_TEST_FAULTS": "tests: the folder of faults and step holds that tests/faults/sitecustomize.py reads",
}
LIST_FIELDS = ("models", "api_keys", "routers", "node_networks", "cors_origins", "fetch_allow_networks")
BOOL_FIELDS = ("verify_models", "fetch_image_urls", "playground")


class InvalidSettings(ValueError):
    """A setting out of its range, or a file or folder the process cannot use: one line for the CLI."""


class Settings(msgspec.Struct, kw_only=True):
    role: Role = "standalone"
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    public_url: str | None = None  # base of image URLs when behind a proxy; default: the request's own
    # models (node and standalone roles)
    models_dir: str = "models"
    models: list[str] = msgspec.field(default_factory=list)  # ids to serve; empty = every model found
    default_model: str | None = None  # default: the first model, by name
    model_aliases: dict[str, str] = msgspec.field(default_factory=dict)  # extra names → model ids
    backend: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # what the openvino backend computes in
    lora_dir: str | None = None  # LoRA adapters (.safetensors) offered to every model they fit
    threads: Positive | None = None
    verify_models: bool = True  # check every file's sha256 at load
    # models as a cache (server.node.catalog): none set loads every model at start-up, as before
    max_loaded_models: Positive | None = None  # models loaded at once; beyond, the least recently used idle one leaves
    max_loaded_bytes: Positive | None = None  # memory the loaded models may take (measured per load)
    rescan_interval: Annotated[float, Meta(ge=0)] = 60.0  # seconds between looks for added/removed folders; 0: never
    render_slots: Positive = 1  # concurrent renders per model
    queue_depth: Count = 8  # requests waiting per model beyond the slots; more → 429
    batch_window: Annotated[float, Meta(ge=0, le=10_000)] = 0.0  # ms a slot waits to fill a batch; 0 = no batching
    max_batch: Positive | None = None  # batching: UNet rows per call (default: the backend's best, else a chunk)
    batch_renders: Positive | None = None  # batching: renders a slot interleaves (default: what one call steps)
    request_timeout: Seconds = 600.0  # seconds from acceptance to answer → 504
    # streaming and A1111 previews: the model's tiny decoder where it has one (else the VAE), the VAE, or "linear"
    preview: Literal["tiny", "full", "linear"] = "tiny"
    keepalive_interval: Seconds = 10.0  # streaming: seconds between keep-alive comments while nothing else is sent
    drain_timeout: Seconds = 25.0  # SIGTERM: seconds to finish accepted work (Kubernetes kills after 30 by default)
    # a sick node (server.node.health): a render not stepping, or renders failing in the engine
    stall_seconds: Seconds = 60.0  # least time a render may go without a step before the node is unhealthy
    stall_factor: Annotated[float, Meta(ge=1)] = 20.0  # ... or this many times its model's median step, if longer
    unhealthy_after_failures: Count = 3  # renders failing in a row with EngineFailure; 0: never
    liveness_seconds: Seconds = 600.0  # unhealthy this long: /healthz fails too (an orchestrator restarts it)
    # uploads and outputs
    max_upload_bytes: Positive = 25 * 1024 * 1024
    max_pixels: Positive = 16_000_000
    images_dir: str = "images"
    image_ttl: Seconds = 3600.0
    images_max_bytes: Positive | None = None  # size cap of images_dir: the oldest go first
    # http(s) image URLs in JSON edits: off, as a client could make the server request its network
    fetch_image_urls: bool = False
    fetch_timeout: Seconds = 10.0  # a whole fetch, redirects included → 400
    fetch_allow_networks: list[str] = msgspec.field(default_factory=list)  # CIDRs exempt from the address check
    # security
    api_keys: list[str] = msgspec.field(default_factory=list)
    api_keys_file: str | None = None
    node_token: str | None = None  # router ↔ node registration
    admin_key: str | None = None  # /v0/* admin routes
    # fleet (router and node roles)
    routers: list[str] = msgspec.field(default_factory=list)  # node: routers to register with
    advertise_url: str | None = None  # node: the URL routers reach it at
    node_id: str | None = None  # node: stable identity (default: derived from the advertise URL)
    heartbeat_interval: Seconds = 3.0
    heartbeat_timeout: Seconds = 15.0  # router: a node silent this long leaves rotation
    connect_timeout: Seconds = 3.0  # router → node
    probe_timeout: Seconds = 2.0  # router: a node's status must answer within this, or it leaves rotation
    node_networks: list[str] = msgspec.field(default_factory=lambda: list(PRIVATE_NETWORKS))  # router
    retries: Count = 2  # router: other nodes tried when one fails before starting
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for log collectors
    cors_origins: list[str] = msgspec.field(default_factory=list)  # browser origins allowed to call the API
    playground: bool = True  # the browser page at GET / (standalone and router roles)

    def __post_init__(self) -> None:
        """Constraints across fields and on the file system (msgspec reports them as ValidationErrors)."""
        if self.heartbeat_interval >= self.heartbeat_timeout:
            raise ValueError(f"heartbeat_interval ({self.heartbeat_interval:g} s) must be shorter than "
                             f"heartbeat_timeout ({self.heartbeat_timeout:g} s)")
        if self.api_keys_file and not os.access(self.api_keys_file, os.R_OK):
            raise ValueError(f"api_keys_file {self.api_keys_file!r} does not exist or cannot be read")
        self.tenants()  # a keys-file line with a limit not understood stops the server here
        if self.role != "node" and not _writable(Path(self.images_dir)):
            raise ValueError(f"images_dir {self.images_dir!r} cannot be created or written")
        for network in self.fetch_allow_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"fetch_allow_networks: {network!r} is not a network (CIDR)") from exc

    def keys(self) -> list[str]:
        """API keys from the setting and the keys file."""
        return [tenant.key for tenant in self.tenants()]

    def tenants(self) -> list[Tenant]:
        """API keys with their limits: the setting's (none), then the keys file's (one per line, `# comments`,
        optional limits after the key: `server.tenants`)."""
        tenants = [Tenant(k) for k in self.api_keys if k]
        if self.api_keys_file:
            lines = Path(self.api_keys_file).read_text().splitlines()
            for number, line in enumerate(lines, 1):
                if (tenant := parse_line(line, f"api_keys_file line {number}")) is not None:
                    tenants.append(tenant)
        return tenants

    def masked(self) -> dict[str, object]:
        shown = msgspec.structs.asdict(self)
        for name in SECRETS:
            value = shown[name]
            if value:
                shown[name] = ["***"] * len(value) if isinstance(value, list) else "***"
        return shown


def _writable(directory: Path) -> bool:
    """The folder, or the nearest existing folder above it (where it will be created), is writable."""
    for candidate in (directory, *directory.absolute().parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def env_name(field: str) -> str:
    """The one environment variable of a setting."""
    return "SDSERVE_" + field.upper()


def _env_help(field: str, const: object) -> str:
    """How --help names a flag's variable: its format where that is not a plain value."""
    if isinstance(const, bool):
        return f"{env_name(field)}={str(const).lower()}"
    if field in LIST_FIELDS:
        return f"{env_name(field)}=A,B"
    return f"{env_name(field)}=NAME=MODEL,…" if field == "model_aliases" else env_name(field)


def _parse_env(field: str, raw: str, kind: object) -> object:
    """Environment values are strings: lists are comma separated, maps are name=value pairs."""
    if field in LIST_FIELDS:
        return _comma_list(raw)
    if field == "model_aliases":
        return dict(pair.split("=", 1) for pair in raw.split(",") if "=" in pair)
    if field in BOOL_FIELDS:
        word = raw.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:  # a typo must not switch on, say, fetching URLs
            raise InvalidSettings(f"invalid setting: {env_name(field)}={raw!r} is not one of "
                                  f"{', '.join(TRUE_WORDS + FALSE_WORDS)}")
        return word in TRUE_WORDS
    return raw  # converted (and range-checked, naming the field) with the rest in from_sources


def _comma_list(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def add_arguments(cli: argparse.ArgumentParser) -> list[argparse.Action]:
    """One flag per setting; every flag's default is None so that unset flags fall through to env. Each
    flag's help ends with its variable."""
    actions: list[argparse.Action] = []

    def flag(*names: str, **options: object) -> None:
        action = cli.add_argument(*names, **options)
        action.help = f"{action.help} [{_env_help(action.dest, action.const)}]"
        actions.append(action)

    flag("--host", help="address to bind (default 127.0.0.1)")
    flag("--port", type=int, help="port (default 8080)")
    flag("--public-url", help="base URL for image links when behind a proxy")
    flag("--models-dir", help="folder of model directories (ours, or ONNX folders in optimum's layout), or one "
         "model directory itself, as `python -m export NAME --output DIR` writes it (default models/)")
    flag("--model", dest="models", action="append", metavar="MODEL", help="serve only this model id (repeatable)")
    flag("--default-model", help="model used when a request names none or an OpenAI model name")
    flag("--model-alias", dest="model_aliases", action="append", metavar="NAME=MODEL",
         help="extra model name mapped to a model id (repeatable)")
    flag("--backend", choices=["auto", "cpu", "openvino", "cuda", "tensorrt-ep", "tensorrt"],
         help="engine backend (default auto: TensorRT plans built for this GPU, else CUDA, else the CPU on OpenVINO "
         "where it is installed, else on ONNX Runtime)")
    flag("--precision", choices=["auto", "bf16", "fp32"],
         help="what the openvino backend computes in (default auto: bf16 where the processor has bf16 instructions, "
         "AVX-512 BF16 or AMX; else fp32); the other backends compute in the graphs' precision")
    flag("--lora-dir", help="folder of LoRA adapters (.safetensors, diffusers or kohya keys): each file is an "
         "adapter named by its stem, offered to every model it fits")
    flag("--threads", type=int, help="threads per graph call of a render (default: all cores)")
    flag("--no-verify-models", dest="verify_models", action="store_const", const=False,
         help="skip the sha256 check of model files at load")
    _model_arguments(flag)
    _batching_arguments(flag)
    flag("--request-timeout", type=float, help="seconds before a request answers 504 (default 600)")
    flag("--preview", choices=["tiny", "full", "linear"],
         help="streaming and A1111 previews: by the model's tiny decoder (default; the full VAE for models exported "
         "without --tiny-decoder), the full VAE decode, or a cheap linear latent-to-RGB map")
    flag("--keepalive-interval", type=float, help="streaming: seconds between keep-alive comments (default 10)")
    flag("--drain-timeout", type=float, help="on SIGTERM, seconds to finish accepted requests before exiting "
         "(default 25: under Kubernetes' default terminationGracePeriodSeconds of 30)")
    _health_arguments(flag)
    flag("--max-upload-bytes", type=int, help="per uploaded file (default 25 MiB)")
    flag("--max-pixels", type=int, help="per uploaded image (default 16 000 000)")
    flag("--images-dir", help="where url-format images are kept (default images/)")
    flag("--image-ttl", type=float, help="seconds an image URL stays valid (default 3600)")
    flag("--images-max-bytes", type=int,
         help="size cap of --images-dir: the sweep deletes the oldest images beyond it (default: no cap)")
    flag("--fetch-image-urls", action="store_const", const=True,
         help="JSON edits: fetch http(s) image URLs (default off: data: URLs only), with the upload limit, no "
         "redirects to other hosts, and never from loopback, link-local, private, multicast or reserved addresses")
    flag("--fetch-timeout", type=float, help="seconds for one image URL fetch, redirects included (default 10)")
    flag("--fetch-allow-networks", action="extend", type=_comma_list, metavar="CIDR,…",
         help="networks fetched from even though loopback/private/link-local/… (repeatable; default none)")
    flag("--api-key", dest="api_keys", action="append", metavar="KEY", help="accepted API key (repeatable)")
    flag("--api-keys-file", help="file of API keys, one per line: KEY [max_concurrent=N] [rate=N/s|m|h]")
    flag("--node-token", help="shared secret for node registration")
    flag("--admin-key", help="key for the /v0 admin routes")
    _fleet_arguments(flag)
    flag("--no-playground", dest="playground", action="store_const", const=False,
         help="do not serve the browser playground page at / (standalone and router roles)")
    flag("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    flag("--log-format", choices=["text", "json"],
         help="text (default) or json: one JSON object per line, the access log with its request_id included")
    flag("--cors-origins", action="extend", type=_comma_list,
         metavar="ORIGIN[,ORIGIN...]", help="browser origins allowed to call the API (CORS), e.g. "
         "https://app.example.com, or * for any (repeatable; default none)")
    return actions


def _model_arguments(flag: Callable[..., object]) -> None:
    """How many models a node keeps loaded, and how often it looks for model folders added or removed."""
    flag("--max-loaded-models", type=int, metavar="N",
         help="keep at most N models loaded: models load on their first request and the least recently used idle "
         "model is unloaded to make room (default: no limit; without this and --max-loaded-bytes every model loads "
         "at start-up)")
    flag("--max-loaded-bytes", type=int, metavar="BYTES",
         help="memory the loaded models may take, each measured by the growth of the process's resident memory "
         "while it loaded (before its first load: the size of its files); a model larger than this fails its load "
         "with 507 model_too_large (default: no limit)")
    flag("--rescan-interval", type=float, metavar="SECONDS",
         help="seconds between looks at --models-dir for model folders added or removed (default 60; 0: only at "
         "start-up and on POST /v0/models/rescan)")


def _batching_arguments(flag: Callable[..., object]) -> None:
    """How many renders a model runs at once, waits for, and steps together."""
    flag("--render-slots", type=int, help="concurrent renders per model (default 1)")
    flag("--queue-depth", type=int, help="waiting requests per model before 429 (default 8)")
    flag("--batch-window", type=float, metavar="MS",
         help="step-level batching: milliseconds an idle render slot waits for more requests to share its UNet "
         "calls (default 0: no batching, each render alone)")
    flag("--max-batch", type=int, metavar="ROWS",
         help="step-level batching: UNet rows per call (default: the largest batch of the TensorRT profiles, else "
         "the model's max batch × 2 for guidance)")
    flag("--batch-renders", type=int, metavar="N",
         help="step-level batching: renders one slot interleaves, what the model takes at once per slot before "
         "its queue (default: as many of the model's default requests as one call of --max-batch rows steps "
         "together, e.g. 4 guided images in 8 rows)")


def _fleet_arguments(flag: Callable[..., object]) -> None:
    """A node's registration with its routers, and a router's view of its nodes."""
    flag("--router", dest="routers", action="append", metavar="URL",
         help="node: router URL to register with (repeatable)")
    flag("--advertise-url", help="node: the URL routers reach this node at")
    flag("--node-id", help="node: stable identity (default: from the advertise URL)")
    flag("--heartbeat-interval", type=float, help="node: seconds between heartbeats (default 3)")
    flag("--heartbeat-timeout", type=float,
         help="router: seconds of silence before a node leaves rotation (default 15)")
    flag("--connect-timeout", type=float, help="router: seconds to connect to a node (default 3)")
    flag("--probe-timeout", type=float,
         help="router: seconds a node has to answer its status probe before leaving rotation (default 2)")
    flag("--node-networks", type=_comma_list,
         metavar="CIDR,…", help="router: networks that node advertise URLs may resolve into (default: loopback "
         "and private ranges, " + ",".join(PRIVATE_NETWORKS) + "; 0.0.0.0/0,::/0 allows any)")
    flag("--retries", type=int, help="router: other nodes tried when one fails before starting (default 2)")


def _health_arguments(flag: Callable[..., object]) -> None:
    """When a node with an engine pool (node, standalone) calls itself sick: `server.node.health`."""
    flag("--stall-seconds", type=float, help="a render that has not stepped for this long (or --stall-factor "
         "times its model's median step time, when longer) makes the node unhealthy: /readyz 503, out of its "
         "routers' rotation (default 60)")
    flag("--stall-factor", type=float, help="see --stall-seconds (default 20)")
    flag("--unhealthy-after-failures", type=int, metavar="K",
         help="K renders in a row failing in the engine make the node unhealthy until one succeeds; it is "
         "tried again after --stall-seconds (default 3; 0: never)")
    flag("--liveness-seconds", type=float, help="unhealthy for this long, /healthz fails too, so that an "
         "orchestrator restarts the process (default 600)")


def from_sources(role: Role, args: argparse.Namespace | None = None,
                 environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    check_variables(environ)
    values: dict[str, object] = {"role": role}
    for field in msgspec.structs.fields(Settings):
        if field.name == "role":
            continue
        given = getattr(args, field.name, None) if args is not None else None
        if given is not None:
            values[field.name] = given
        elif environ.get(env_name(field.name), "").strip():  # empty (a compose ${VAR} unset): not given
            values[field.name] = _parse_env(field.name, environ[env_name(field.name)], field.type)
    if isinstance(values.get("model_aliases"), list):
        values["model_aliases"] = dict(item.split("=", 1) for item in values["model_aliases"] if "=" in item)
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidSettings(f"invalid setting: {exc}") from exc


def variables() -> set[str]:
    """Every SDSERVE_* variable a server reads or accepts."""
    return {env_name(f.name) for f in msgspec.structs.fields(Settings) if f.name != "role"} | set(OTHER_VARIABLES)


def check_variables(environ: Mapping[str, str]) -> None:
    """An SDSERVE_* variable that is neither a setting nor one of OTHER_VARIABLES is a mistake: refuse it,
    naming the variable meant (a flag's name as a variable, e.g. SDSERVE_API_KEY, maps to its setting's)."""
    known = variables()
    unknown = sorted(name for name in environ if name.startswith("SDSERVE_") and name not in known)
    if not unknown:
        return
    by_flag = _variables_by_flag_name()
    suffixes = {name.removeprefix("SDSERVE_"): name for name in sorted(known)}
    meant = []
    for name in unknown:
        close = difflib.get_close_matches(name.removeprefix("SDSERVE_"), suffixes, n=1, cutoff=0.7)
        guess = by_flag.get(name) or (suffixes[close[0]] if close else None)
        meant.append(f"{name} (did you mean {guess}?)" if guess else name)
    raise InvalidSettings(f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(meant)}: "
                          "`python -m server --help` names each setting's SDSERVE_ variable")


def _variables_by_flag_name() -> dict[str, str]:
    """SDSERVE_<FLAG NAME> → the setting's variable, for flags named otherwise than their setting."""
    found = {}
    for action in add_arguments(argparse.ArgumentParser(add_help=False)):
        meant = env_name(action.dest)
        if isinstance(action.const, bool):
            meant += f"={str(action.const).lower()}"
        elif action.dest in LIST_FIELDS or action.dest == "model_aliases":
            meant += ", comma-separated"
        for option in action.option_strings:
            found["SDSERVE_" + option.lstrip("-").replace("-", "_").upper()] = meant
    return found
