"""Reading the broker configuration file, with paths resolved against the file's own directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pdp.errors import SourceError
from pdp.registry.file import yaml_error

PLUGIN_PATH = "broker_plugin.plugin.DeviceAuthorizationPlugin"
DEFAULT_CONFIG = "deploy/broker.yaml"
LISTENER_PATH_KEYS = ("cafile", "capath", "certfile", "keyfile")
PLUGIN_PATH_KEYS = ("model", "policy", "registry", "assertion_db", "spool_dir", "crl", "l2_key_file", "admin_socket")


def _resolve(base: Path, value: Any) -> Any:
    if isinstance(value, list):
        return [_resolve(base, item) for item in value]
    if isinstance(value, str) and value and not Path(value).is_absolute() and "://" not in value:
        return str((base / value).resolve())
    return value


def load_broker_config(path: str | Path, *, check_files: bool = True, need_listeners: bool = True) -> dict[str, Any]:
    """The amqtt configuration dict with every relative file path made absolute; SourceError if unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(str(path), None, f"cannot read broker config: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SourceError(str(path), None, "broker config is not UTF-8 text") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise yaml_error(str(path), exc) from None
    if not isinstance(config, dict):
        raise SourceError(str(path), None, "broker config must be a mapping with 'listeners' and 'plugins'")
    base = path.resolve().parent
    listeners = config.get("listeners")
    if listeners is None and not need_listeners:  # the CLI's commands read only the plugin's settings
        listeners = {}
    elif not isinstance(listeners, dict) or "default" not in listeners:
        raise SourceError(str(path), None, "'listeners' must be a mapping with a 'default' listener")
    for name, listener in listeners.items():
        if not isinstance(listener, dict):
            raise SourceError(str(path), None, f"listener {name!r} must be a mapping")
        for key in LISTENER_PATH_KEYS:
            if key in listener:
                listener[key] = _resolve(base, listener[key])
                if check_files and not Path(listener[key]).exists():
                    raise SourceError(str(path), None, f"listener {name!r}: {key} {listener[key]} does not exist"
                                      " (run 'mqtt-pdp pki' for a development PKI)")
    plugins = config.get("plugins")
    if not isinstance(plugins, dict) or PLUGIN_PATH not in plugins:
        raise SourceError(str(path), None, f"'plugins' must configure {PLUGIN_PATH}")
    plugin = plugins[PLUGIN_PATH] or {}
    if not isinstance(plugin, dict):
        raise SourceError(str(path), None, f"{PLUGIN_PATH} settings must be a mapping")
    for key in PLUGIN_PATH_KEYS:
        if key in plugin:
            plugin[key] = _resolve(base, plugin[key])
    plugins[PLUGIN_PATH] = plugin
    return config


def plugin_settings(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config["plugins"][PLUGIN_PATH])


def settings_of(config_path: str | None) -> dict[str, Any]:
    """The plugin settings of ``config_path``, else of deploy/broker.yaml if present, else none (for the CLI)."""
    path = config_path or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None)
    return plugin_settings(load_broker_config(path, check_files=False, need_listeners=False)) if path else {}
