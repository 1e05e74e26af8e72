"""One Settings Struct per process, filled from CLI flags, then `SDSERVE_*` environment variables, then
defaults (a flag wins over the environment). Printed at start-up with secrets masked."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

import msgspec

Role = Literal["standalone", "node", "router"]
SECRETS = ("api_keys", "node_token", "admin_key")
OPENAI_MODEL_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")


class Settings(msgspec.Struct, kw_only=True):
    role: Role = "standalone"
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None  # base of image URLs when behind a proxy; default: the request's own
    # models (node and standalone roles)
    models_dir: str = "models"
    models: list[str] = msgspec.field(default_factory=list)  # ids to serve; empty = every model found
    default_model: str | None = None  # default: the first model, by name
    model_aliases: dict[str, str] = msgspec.field(default_factory=dict)  # extra names → model ids
    backend: str = "auto"
    lora_dir: str | None = None  # LoRA adapters (.safetensors) offered to every model they fit
    threads: int | None = None
    verify_models: bool = True  # check every file's sha256 at load
    render_slots: int = 1  # concurrent renders per model
    queue_depth: int = 8  # requests waiting per model beyond the slots; more → 429
    request_timeout: float = 600.0  # seconds from acceptance to answer → 504
    preview: str = "full"  # streaming: partial images by the full VAE decode, or "linear" (cheap, blurry)
    keepalive_interval: float = 10.0  # streaming: seconds between keep-alive comments while nothing else is sent
    # uploads and outputs
    max_upload_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 16_000_000
    images_dir: str = "images"
    image_ttl: float = 3600.0
    # security
    api_keys: list[str] = msgspec.field(default_factory=list)
    api_keys_file: str | None = None
    node_token: str | None = None  # router ↔ node registration
    admin_key: str | None = None  # /v0/* admin routes
    # fleet (router and node roles)
    routers: list[str] = msgspec.field(default_factory=list)  # node: routers to register with
    advertise_url: str | None = None  # node: the URL routers reach it at
    node_id: str | None = None  # node: stable identity (default: derived from the advertise URL)
    heartbeat_interval: float = 3.0
    heartbeat_timeout: float = 15.0  # router: a node silent this long leaves rotation
    connect_timeout: float = 3.0  # router → node
    retries: int = 2  # router: other nodes tried when one fails before starting
    log_level: str = "info"

    def keys(self) -> list[str]:
        """API keys from the setting and the keys file (one per line, # comments)."""
        keys = [k for k in self.api_keys if k]
        if self.api_keys_file:
            lines = Path(self.api_keys_file).read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return keys

    def masked(self) -> dict[str, object]:
        shown = msgspec.structs.asdict(self)
        for name in SECRETS:
            value = shown[name]
            if value:
                shown[name] = ["***"] * len(value) if isinstance(value, list) else "***"
        return shown


def _env_name(field: str) -> str:
    return "SDSERVE_" + field.upper()


def _parse_env(field: str, raw: str, kind: object) -> object:
    """Environment values are strings: lists are comma separated, maps are name=value pairs."""
    if field in ("models", "api_keys", "routers"):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if field == "model_aliases":
        return dict(pair.split("=", 1) for pair in raw.split(",") if "=" in pair)
    if field == "verify_models":
        return raw.strip().lower() not in ("0", "false", "no", "off")
    return msgspec.convert(raw, type=kind, strict=False)


def add_arguments(cli: argparse.ArgumentParser) -> None:
    """One flag per setting; every flag's default is None so that unset flags fall through to env."""
    flag = cli.add_argument
    flag("--host", help="address to bind (default 127.0.0.1)")
    flag("--port", type=int, help="port (default 8080)")
    flag("--public-url", help="base URL for image links when behind a proxy")
    flag("--models-dir", help="folder of model directories (default models/)")
    flag("--model", dest="models", action="append", help="serve only this model id (repeatable)")
    flag("--default-model", help="model used when a request names none or an OpenAI model name")
    flag("--model-alias", dest="model_aliases", action="append", metavar="NAME=MODEL",
         help="extra model name mapped to a model id (repeatable)")
    flag("--backend", choices=["auto", "cpu", "cuda", "tensorrt-ep", "tensorrt"],
         help="engine backend (default auto: TensorRT plans built for this GPU, else the best ONNX Runtime provider)")
    flag("--lora-dir", help="folder of LoRA adapters (.safetensors, diffusers or kohya keys): each file is an "
         "adapter named by its stem, offered to every model it fits (or SDSERVE_LORA_DIR)")
    flag("--threads", type=int, help="ONNX Runtime threads per render (default: all cores)")
    flag("--no-verify-models", dest="verify_models", action="store_const", const=False,
         help="skip the sha256 check of model files at load")
    flag("--render-slots", type=int, help="concurrent renders per model (default 1)")
    flag("--queue-depth", type=int, help="waiting requests per model before 429 (default 8)")
    flag("--request-timeout", type=float, help="seconds before a request answers 504 (default 600)")
    flag("--preview", choices=["full", "linear"],
         help="streaming: partial images by the full VAE decode (default) or a cheap linear latent-to-RGB map")
    flag("--keepalive-interval", type=float, help="streaming: seconds between keep-alive comments (default 10)")
    flag("--max-upload-bytes", type=int, help="per uploaded file (default 25 MiB)")
    flag("--max-pixels", type=int, help="per uploaded image (default 16 000 000)")
    flag("--images-dir", help="where url-format images are kept (default images/)")
    flag("--image-ttl", type=float, help="seconds an image URL stays valid (default 3600)")
    flag("--api-key", dest="api_keys", action="append", help="accepted API key (repeatable; or SDSERVE_API_KEYS)")
    flag("--api-keys-file", help="file of accepted API keys, one per line")
    flag("--node-token", help="shared secret for node registration (or SDSERVE_NODE_TOKEN)")
    flag("--admin-key", help="key for the /v0 admin routes (or SDSERVE_ADMIN_KEY)")
    flag("--router", dest="routers", action="append", help="node: router URL to register with (repeatable)")
    flag("--advertise-url", help="node: the URL routers reach this node at")
    flag("--node-id", help="node: stable identity (default: from the advertise URL)")
    flag("--heartbeat-interval", type=float, help="node: seconds between heartbeats (default 3)")
    flag("--heartbeat-timeout", type=float,
         help="router: seconds of silence before a node leaves rotation (default 15)")
    flag("--connect-timeout", type=float, help="router: seconds to connect to a node (default 3)")
    flag("--retries", type=int, help="router: other nodes tried when one fails before starting (default 2)")
    flag("--log-level", choices=["debug", "info", "warning", "error"], help="default info")


def from_sources(role: Role, args: argparse.Namespace | None = None,
                 environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {"role": role}
    fields = msgspec.structs.fields(Settings)
    for field in fields:
        if field.name == "role":
            continue
        given = getattr(args, field.name, None) if args is not None else None
        if given is not None:
            values[field.name] = given
        elif _env_name(field.name) in environ:
            values[field.name] = _parse_env(field.name, environ[_env_name(field.name)], field.type)
    if isinstance(values.get("model_aliases"), list):
        values["model_aliases"] = dict(item.split("=", 1) for item in values["model_aliases"] if "=" in item)
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"server: error: invalid setting: {exc}") from exc
